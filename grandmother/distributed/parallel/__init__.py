"""Model parallelism: one replica of the network spread over several processes by spatial partitioning.

    partition.py   who owns which block of every layer; the halos each block needs (pure arithmetic)
    halo.py        autograd-aware halo exchange over torch.distributed (gloo on CPU, NCCL on CUDA)
    mp_model.py    one worker's share of the network: its W1/W2 slices, pooling, LCN, loss terms
"""
