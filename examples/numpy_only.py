"""The MoS core without torch: pools, index tables, forward and backward on NumPy arrays, and
plain SGD fitting a toy regression.

Four layers of one module type share an A-pool and a B-pool. Layer k must learn the map
x -> x T_k^T, where each T_k is a random rank-2 matrix; the loss is the mean squared error summed
over the layers. Every layer's backward accumulates into the same two pool gradients, which is
what sharing means for training.

    python examples/numpy_only.py            # 300 steps
    python examples/numpy_only.py --small    # 40 steps (CI)
"""
import argparse

import numpy as np

import mos

D_IN, D_OUT, LAYERS, BATCH = 32, 24, 4, 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few steps (CI)")
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args(argv)
    steps = 40 if args.small else 300

    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=4.0,
                           init_lora_weights=True)
    pool = mos.ShardPool("proj", d_in=D_IN, d_out=D_OUT, n_layers=LAYERS, config=config)
    pool_a, pool_b = pool.init_values(np.float32)  # A uniform, B zero: the adapter starts as a no-op
    tables = [pool.indices(layer=k) for k in range(LAYERS)]
    print(f"pools {pool_a.shape} and {pool_b.shape}: {pool.num_parameters()} parameters, "
          f"the same as LoRA at rank {config.equivalent_rank}; each layer gathers r = {config.r}")

    rng = np.random.default_rng(0)
    targets = [(rng.standard_normal((D_OUT, 2)) @ rng.standard_normal((2, D_IN)) / D_IN).astype(np.float32)
               for _ in range(LAYERS)]
    losses = []
    for step in range(steps):
        x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
        grad_a, grad_b = np.zeros_like(pool_a), np.zeros_like(pool_b)
        loss = 0.0
        for (index_a, index_b), target in zip(tables, targets):
            y = mos.functional.forward(x, pool_a, index_a, pool_b, index_b, config.scaling)
            err = y - x @ target.T
            loss += float(np.mean(err ** 2))
            dy = (2.0 / err.size) * err
            mos.functional.backward(dy, x, pool_a, index_a, pool_b, index_b, config.scaling,
                                    dpool_a=grad_a, dpool_b=grad_b, need_dx=False)  # accumulates
        pool_a -= args.lr * grad_a
        pool_b -= args.lr * grad_b
        losses.append(loss)
        if step % max(steps // 5, 1) == 0:
            print(f"step {step:4d}  loss {loss:.5f}")
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f} after {steps} steps of SGD")
    assert losses[-1] < 0.9 * losses[0], "SGD did not lower the loss"


if __name__ == "__main__":
    main()
