"""python -m grandmother ...  (same as the `grandmother` command)"""
from grandmother.commands import main

raise SystemExit(main())
