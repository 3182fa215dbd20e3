"""python -m grandmother ...  (same as the `grandmother` command)"""
from .cli import main

raise SystemExit(main())
