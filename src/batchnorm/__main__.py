import sys

from batchnorm.cli import main

sys.exit(main())
