"""``python -m deqbench.measure memory|bench [options]``; see deqbench.measure.runner."""

import sys

from deqbench.measure.runner import main

sys.exit(main())
