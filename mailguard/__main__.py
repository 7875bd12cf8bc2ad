import sys

from mailguard.config.check import main

sys.exit(main())
