"""Where the in-package demo sample lives (built by scripts/build_sample.py from ../shared/data)."""
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent.parent / "sample"
