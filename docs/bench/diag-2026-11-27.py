"""One-off GPU diagnostic: where does the engine lose time against bare generate on the
full-size model, and how does a decode step scale with batch size (bare vs engine)."""
import argparse, copy, statistics, sys, threading, time
sys.path.insert(0, ".")
import torch
from bench.common import add_bench_args, setup, build_engine, bench_request, bench_messages
from engine.worker import BatchCriteria, RowState, WorkItem, collate
from engine.sampling import generate_kwargs, batch_key
from engine.stream import RequestHandle
from engine.types import Finished, RequestStats
from transformers import StoppingCriteriaList

p = argparse.ArgumentParser(); add_bench_args(p)
p.add_argument("--n", type=int, default=128); p.add_argument("--reps", type=int, default=4)
p.add_argument("--bs", default="1,2,4,8"); p.add_argument("--bs-tokens", type=int, default=64)
args = p.parse_args()
setup(args)
eng = build_engine(args)
w, model = eng.worker, eng.loaded.model
dev = eng.device.torch_device
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
N = args.n
req = bench_request(N)
prompt = eng.renderer.prepare(req)
def to_dev(inputs):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dev)
            if v.is_floating_point(): v = v.to(eng.device.dtype)
        out[k] = v
    return out
inputs1 = to_dev(collate([prompt], w.pad_id))
plen = inputs1["input_ids"].shape[1]
kw = generate_kwargs(req.sampling, w.generation_config, N)["generation_config"]
bare = copy.deepcopy(model.generation_config)
bare.do_sample = False; bare.temperature, bare.top_p, bare.top_k = 1.0, 1.0, 50
bare.max_new_tokens, bare.max_length = N, None; bare.eos_token_id = None

def gen(inputs, cfg, crit=None):
    sync(); t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=cfg,
                             **({"stopping_criteria": StoppingCriteriaList([crit])} if crit else {}))
    ids = out[:, inputs["input_ids"].shape[1]:].tolist()
    return time.perf_counter() - t, ids
def crit_for(consumer):
    h = RequestHandle("x"); item = WorkItem(req, prompt, h, batch_key(req.sampling))
    rows = [RowState(item, w.tokenizer, w.eos_ids, w.pieces)]; th = None
    if consumer:
        th = threading.Thread(target=lambda: [e for e in h.events()]); th.start()
    return BatchCriteria(rows), h, th
def with_crit(cfg, consumer):
    c, h, th = crit_for(consumer)
    r = gen(inputs1, cfg, c)
    if th: h.push(Finished("length", RequestStats())); th.join()
    return r
def in_thread(fn):
    box = []
    def body():
        eng.device.bind_thread(); box.append(fn())
    t = threading.Thread(target=body); t.start(); t.join(); return box[0]
def engine_run():
    sync(); t = time.perf_counter()
    text, fin = eng.generate(bench_request(N), timeout=600)
    return time.perf_counter() - t, None
V = {
  "bare cfg, main thread": lambda: gen(inputs1, bare),
  "engine cfg, main thread": lambda: gen(inputs1, kw),
  "bare cfg, other thread": lambda: in_thread(lambda: gen(inputs1, bare)),
  "engine cfg + criteria": lambda: with_crit(kw, False),
  "engine cfg + criteria + consumer": lambda: with_crit(kw, True),
  "engine.generate (whole path)": engine_run,
}
print(f"prompt {plen} tokens, {N} new tokens, {args.reps} interleaved reps", flush=True)
res = {k: [] for k in V}; ids = {}
for k, f in V.items():
    _, ids[k] = f()
for r in range(args.reps):
    for k, f in (list(V.items())[r % len(V):] + list(V.items())[:r % len(V)]):
        res[k].append(f()[0])
b = statistics.median(res["bare cfg, main thread"])
for k, v in res.items():
    m = statistics.median(v)
    print(f"{k:34s} median {m*1000:8.1f} ms  {N/m:6.1f} tok/s  bare/this {b/m:.3f}  runs "
          + " ".join(f"{x*1000:.0f}" for x in v), flush=True)
ref = ids["bare cfg, main thread"][0]
for k, x in ids.items():
    if x is None: continue
    x = x[0]; first = next((i for i, (a, c) in enumerate(zip(ref, x)) if a != c), None)
    print(f"  ids vs bare main: {k}: first difference at {first}", flush=True)

# decode step vs batch size: bare generate on a batch of identical image prompts, and the engine
T = args.bs_tokens
for bs in [int(x) for x in args.bs.split(",")]:
    batch = to_dev(collate([prompt] * bs, w.pad_id))
    cfg1 = copy.deepcopy(bare); cfg1.max_new_tokens = 1
    cfgT = copy.deepcopy(bare); cfgT.max_new_tokens = T
    gen(batch, cfgT)
    t1 = min(gen(batch, cfg1)[0] for _ in range(2)); tT = min(gen(batch, cfgT)[0] for _ in range(2))
    step_bare = (tT - t1) / (T - 1)
    def eng_batch():
        sync(); t = time.perf_counter()
        with w.arriving():
            hs = [eng.submit(bench_request(T)) for _ in range(bs)]
        fins = [h.collect(timeout=600)[1] for h in hs]
        return time.perf_counter() - t, fins
    eng_batch()
    runs = [eng_batch() for _ in range(2)]
    best = min(runs, key=lambda r: r[0])
    ttft = max(f.stats.ttft_s for f in best[1])
    step_eng = (best[0] - ttft) / (T - 1)
    print(f"batch {bs}: bare step {step_bare*1000:.1f} ms (prefill+1 {t1*1000:.0f} ms) | engine step "
          f"{step_eng*1000:.1f} ms (ttft {ttft*1000:.0f} ms, largest batch {w.largest_batch}) | "
          f"aggregate tok/s bare {bs/step_bare:.0f} engine {bs/step_eng:.0f}", flush=True)
eng.close()
