"""`python -m saetool.config [README.md]`: rewrite the flag tables from the config docstrings."""

import sys

from saetool.config.flags import update_readme_flags

update_readme_flags(*sys.argv[1:2])
