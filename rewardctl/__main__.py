import sys

from rewardctl.cli import main

sys.exit(main())
