"""`python -m eva.train --config CONFIG.yaml [dotted.key=value ...]`"""
import sys

from eva.train.main import main

sys.exit(main())
