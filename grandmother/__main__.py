"""python -m grandmother ...  (same as the `grandmother` command)"""
from .commands import main

raise SystemExit(main())
