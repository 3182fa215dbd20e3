"""Data: frames and images in, a sharded dataset out; the face audit; labeled test sets."""
