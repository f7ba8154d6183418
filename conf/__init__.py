"""rewardctl's Hydra config tree. Installed as the package `rewardctl.conf` so that it is found from a wheel."""
