"""Tests one hypothesis for the candidates' over-read (README): that the self-normalised candidate estimate, whose
weights are normalised over the same N candidates that serve as opponents, over-reads V(pi) = E_{y~pi, y'~ref}
P(y > y') as pi tilts towards the winning responses. A discrete toy with the exact value: python same_pool_bias.py"""
import numpy as np
rng = np.random.default_rng(0)
M, N, T = 200, 8, 200000
r = rng.normal(size=M); ref = np.full(M, 1 / M)
P = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
for c in [0.0, 0.1, 0.2, 0.4, 0.8]:
    pi = ref * np.exp(c * r); pi /= pi.sum()
    true = pi @ P @ ref
    idx = rng.choice(M, size=(T, N), p=ref)
    w = pi[idx] / ref[idx]
    wins = P[idx[:, :, None], idx[:, None, :]]            # T, N, N
    row = (wins.sum(-1) - 0.5) / (N - 1)                   # mean win over the others
    same_pool = ((w / w.sum(1, keepdims=True)) * row).sum(1).mean()
    # opponents from an independent pool
    idx2 = rng.choice(M, size=(T, N), p=ref)
    row2 = P[idx[:, :, None], idx2[:, None, :]].mean(-1)
    other_pool = ((w / w.sum(1, keepdims=True)) * row2).sum(1).mean()
    print(f"tilt {c}: true {true:.4f}  same-pool SNIS {same_pool:.4f} ({same_pool-true:+.4f})  independent opponents {other_pool:.4f} ({other_pool-true:+.4f})")
