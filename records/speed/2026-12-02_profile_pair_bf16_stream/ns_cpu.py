"""Eager vs compiled (inductor, here on the CPU) Muon orthogonalisations against the float64 Polar Express
iteration, on small shapes (3 matrices each): the relative error of each form (MUON_COMPILE).
    PYTHONPATH=. python3 records/speed/2026-12-02_profile_pair_bf16_stream/ns_cpu.py > .../ns_cpu.txt"""
import torch
import train_gpt as tg
torch.manual_seed(0)
def ref_ns(g, steps):
    x = g.double()
    tall = x.size(-2) > x.size(-1)
    if tall: x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in tg.POLAR_EXPRESS[:steps]:
        m = x @ x.mT
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.mT if tall else x
def err(a, b): return ((a.double()-b).norm()/b.norm()).item()
for shape in [(3,64,64),(3,32,64),(3,256,64),(3,64,256)]:
    g = torch.randn(*shape)
    ref = ref_ns(g, 5)
    e = tg.newton_schulz(g, 5); gr = tg.gram_newton_schulz(g, 5)
    c = torch.compile(tg.newton_schulz, dynamic=False, fullgraph=True)(g, 5)
    cg = torch.compile(tg.gram_newton_schulz, dynamic=False, fullgraph=True)(g, 5)
    print(shape, "eager", round(err(e, ref),4), "compiled", round(err(c, ref),4), "gram eager", round(err(gr, ref),4), "gram compiled", round(err(cg, ref),4))
