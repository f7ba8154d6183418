from rewardctl.cli import entry

entry()
