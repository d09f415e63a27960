"""`python -m bench`: every measure, one command (see `bench.run`)."""

from bench.run import main

raise SystemExit(main())
