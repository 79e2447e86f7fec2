"""`python -m saetool.config [docs/flags.md]`: write the flags page from the config docstrings (run it from the
repository root after changing a flag; tests/config/test_flags.py checks the page)."""

import sys

from saetool.config.flags import write_flags_page

write_flags_page(*sys.argv[1:2])
