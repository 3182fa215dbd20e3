"""What one training step costs each worker of a partitioned replica: memory and halo bytes.

Computed from the config and the partition alone (no weights are built), so it works for the `paper`
preset and larger on any machine; `grandmother model-info --model-parallel P` prints it. The halo
figures are the bytes each worker SENDS in one training step (forward and backward), exchange by
exchange, exactly as mp_model.py performs them; tests/test_model_parallel.py checks them against the
bytes counted from the tensors actually exchanged (halo.HALO_BYTES).

Exchanges of stage i (B images, element size e, C input channels, M maps):
    stage{i}.input           encoder input halo, C channels; not for stage 0 (every worker has the
                             whole image batch); backward only with stage_gradients=joint
    stage{i}.reconstruction  partial reconstructions sent to the pixels' owners, C channels; backward
                             sends the owners' gradients back (same volume)
    stage{i}.filter          pooling halo of y, M maps, forward and backward
    stage{i}.pool            LCN halo of the pooled maps (2 LCN radii), M maps; backward only when the
                             LCN output feeds a later stage's objective (joint, not the last stage)
"""
from __future__ import annotations

from grandmother.distributed.parallel.partition import Partition, exchange, plan_stages

OPTIMIZER_STATES = {"sgd": 0, "adagrad": 1, "adam": 2}  # tensors of the parameters' size kept per parameter


def _pairs(owns, needs, k: int, gather: bool):
    """(peer, locations) that worker k sends in one exchange: a gather sends k's owned parts that peers
    need; its adjoint (a scatter-add, or a gather's backward) sends the parts of k's need that peers own."""
    ex = exchange(owns, needs, k, "")
    return [(peer, r.area) for peer, r in (ex.sends if gather else ex.recvs)]


def halo_traffic(model_cfg, partition: Partition, batch: int, element_size: int = 4):
    """(sent, received): per worker, {"LABEL/forward" | "LABEL/backward": bytes} of one training step."""
    plans = plan_stages(model_cfg, partition)
    joint = model_cfg.stage_gradients == "joint"
    n = partition.size
    sent = [dict() for _ in range(n)]
    received = [dict() for _ in range(n)]

    def add(label, channels, owns, needs, gather):
        for k in range(n):
            for peer, area in _pairs(owns, needs, k, gather):
                b = batch * channels * area * element_size
                sent[k][label] = sent[k].get(label, 0) + b
                received[peer][label] = received[peer].get(label, 0) + b

    for plan, sc in zip(plans, model_cfg.stages):
        i = plan.index
        c = model_cfg.channels if i == 0 else model_cfg.stages[i - 1].maps
        inp = (plan.input_own, plan.input_need)
        if i > 0:
            add(f"stage{i}.input/forward", c, *inp, True)
            if joint:  # the gradients of the received halo go back to their owners
                add(f"stage{i}.input/backward", c, *inp, False)
        add(f"stage{i}.reconstruction/forward", c, *inp, False)
        add(f"stage{i}.reconstruction/backward", c, *inp, True)
        if plan.pooled:
            add(f"stage{i}.filter/forward", sc.maps, plan.filter_own, plan.filter_need, True)
            add(f"stage{i}.filter/backward", sc.maps, plan.filter_own, plan.filter_need, False)
        if plan.lcn:
            add(f"stage{i}.pool/forward", sc.maps, plan.output_own, plan.pool_need, True)
            if joint and i < len(plans) - 1:
                add(f"stage{i}.pool/backward", sc.maps, plan.output_own, plan.pool_need, False)
    return sent, received


def worker_costs(cfg, partition: Partition, batch: int | None = None, element_size: int = 4) -> list[dict]:
    """Per worker: parameter, gradient, optimizer-state and activation bytes, and halo bytes per step.

    Activations are an estimate: the tensors a training step keeps for backward (stage inputs with halo,
    y with halo, pooled maps with halo and the LCN temporaries, partial and summed reconstructions);
    kernel workspaces come on top.
    """
    m = cfg.model
    batch = batch or cfg.train.batch_size
    plans = plan_stages(m, partition)
    sent, received = halo_traffic(m, partition, batch, element_size)
    states = OPTIMIZER_STATES.get(cfg.train.optimizer, 1)
    if cfg.train.optimizer == "sgd" and cfg.train.momentum > 0:
        states = 1
    rows = []
    for k in range(partition.size):
        params = acts = 0
        c = m.channels
        for plan, sc in zip(plans, m.stages):
            f, need, own = plan.filter_own[k], plan.input_need[k], plan.input_own[k]
            params += 2 * f.area * sc.maps * c * plan.field ** 2
            acts += batch * c * (2 * need.area + own.area)  # input with halo, partial and summed reconstruction
            acts += batch * sc.maps * (f.area + plan.filter_need[k].area)  # y and y with the pooling halo
            if plan.pooled:
                acts += batch * sc.maps * (plan.output_own[k].area + (4 * plan.pool_need[k].area if plan.lcn else 0))
            c = sc.maps
        rows.append({"worker": k, "block": str(plans[0].filter_own[k]), "parameters": params,
                     "parameter_bytes": params * element_size, "gradient_bytes": params * element_size,
                     "optimizer_bytes": states * params * element_size, "activation_bytes": acts * element_size,
                     "halo_sent_bytes": sum(sent[k].values()), "halo_received_bytes": sum(received[k].values()),
                     "halo_sent_by_exchange": sent[k]})
    return rows


def format_worker_costs(rows: list[dict], partition: Partition, batch: int) -> str:
    gib = lambda b: f"{b / 2**30:.3f}"
    mib = lambda b: f"{b / 2**20:.2f}"
    out = [f"model parallel: {partition} ({partition.size} workers), batch {batch}, float32; per worker and "
           f"training step",
           f"{'worker':>6}  {'parameters':>14}  {'params GiB':>10}  {'grads+opt GiB':>13}  {'activations GiB':>15}  "
           f"{'halo sent MiB':>13}  {'halo recv MiB':>13}"]
    for r in rows:
        out.append(f"{r['worker']:>6}  {r['parameters']:>14,}  {gib(r['parameter_bytes']):>10}  "
                   f"{gib(r['gradient_bytes'] + r['optimizer_bytes']):>13}  {gib(r['activation_bytes']):>15}  "
                   f"{mib(r['halo_sent_bytes']):>13}  {mib(r['halo_received_bytes']):>13}")
    total = sum(r["halo_sent_bytes"] for r in rows)
    out.append(f"halo bytes per step, all workers: {total:,} ({mib(total)} MiB); activations are an estimate "
               f"(kernel workspaces come on top)")
    return "\n".join(out)


def step_time(cfg, partition: Partition, device_flops: float, link_bytes_per_s: float, latency_s: float,
              batch: int | None = None, element_size: int = 4) -> dict:
    """A time-per-step model of one partitioned replica (seconds), no overlap of compute and transfers.

        compute  = max over workers of (its share of the training FLOPs) / device_flops
                   (a worker's share of a stage: its filter locations / all of them)
        exchange = sum over the step's exchanges of (latency + the largest bytes one worker sends in it
                   / link_bytes_per_s)     every exchange waits for its slowest pair
    Returns {"compute_s", "exchange_s", "step_s", "images_per_s", "exchanges", "max_bytes_per_worker"}.
    """
    from grandmother.nn.shapes import stage_shapes

    batch = batch or cfg.train.batch_size
    plans = plan_stages(cfg.model, partition)
    shapes = stage_shapes(cfg.model)
    flops = [sum(sh.flops_train * plan.filter_own[k].area / (sh.filter[1] * sh.filter[2])
                 for plan, sh in zip(plans, shapes)) * batch for k in range(partition.size)]
    sent, _ = halo_traffic(cfg.model, partition, batch, element_size)
    labels = sorted({label for row in sent for label in row})
    exchange_s = sum(latency_s + max(row.get(label, 0) for row in sent) / link_bytes_per_s for label in labels)
    compute_s = max(flops) / device_flops
    step = compute_s + exchange_s
    return {"compute_s": compute_s, "exchange_s": exchange_s, "step_s": step, "images_per_s": batch / step,
            "exchanges": len(labels), "max_bytes_per_worker": max(sum(row.values()) for row in sent)}
