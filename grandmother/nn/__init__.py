"""The network: locally connected filtering, L2 pooling, LCN and the per-stage objective."""
