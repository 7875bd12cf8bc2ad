import sys

from mailguard.check import main

sys.exit(main())
