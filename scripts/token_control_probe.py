"""Feasibility probe for issue 16's positive-control suite for token routing (a maintainer's
experiment, not part of the library; moerge.zoo will get the suite itself).

Four experts on disjoint vocabularies (a-j shift +1, digits +1, A-J reversed alphabet, k-t
shift -1), each a PEFT LoRA trained to map its own segments and copy foreign ones unchanged, on
a tiny Llama pre-trained to copy; held-out prompts mix three segments of three vocabularies
("a b | 3 7 | K L => b c | 4 8 | P O" style, '|' between segments), scored per segment.
It prints each expert's held-in exact match and held-out segment accuracy, then PHATGOOSE's and
Arrow's held-out segment accuracy and top-1 routing accuracy on the prompts' item tokens.

    python scripts/token_control_probe.py HIDDEN LAYERS BASE_STEPS EXPERT_STEPS GATE_STEPS GATE_BATCH_MULTIPLE

Measured on 2 CPU cores (2026-11-27; single experts score 24-26 % of held-out segments):
  128 4 600 300 100 1: PHATGOOSE 96.8 % (input routing 58.6 %), Arrow 24.0 % (33.3 %); 160 s
  128 4 600 300 100 8: PHATGOOSE 97.0 % (60.8 %), Arrow 24.0 %; 255 s (gates at batch 256: 118 s)
   96 3 300 150 100 1: PHATGOOSE 99.5 % (66.0 %), Arrow 17.7 % (31.0 %); 50 s in all
"""
import copy, json, random, sys, time
import torch
torch.set_num_threads(2)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from moerge.zoo.train import make_base_model, train_loop, generate_answers

HID, LAYERS, HEADS = int(sys.argv[1]), int(sys.argv[2]), 4
BASE_STEPS, EXP_STEPS = int(sys.argv[3]), int(sys.argv[4])
GATE_STEPS, ACCUM = int(sys.argv[5]), int(sys.argv[6])
low = list("abcdefghij"); dig = [str(i) for i in range(10)]; cap = list("ABCDEFGHIJ"); sym = list("klmnopqrst")
V = {"low": low, "dig": dig, "cap": cap, "sym": sym}
MAP = {"low": lambda c: low[(low.index(c) + 1) % 10], "dig": lambda c: dig[(dig.index(c) + 1) % 10],
       "cap": lambda c: cap[9 - cap.index(c)], "sym": lambda c: sym[(sym.index(c) - 1) % 10]}
words = ["|", "=>", *low, *dig, *cap, *sym]
vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}
core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
tok.padding_side = "left"

class P:
    def __init__(s, prompt, target, segs=None): s.prompt, s.target, s.segs = prompt, target, segs

def seg(rng, v): return [rng.choice(V[v]) for _ in range(rng.randint(2, 4))]
def example(rng, vocabs, mapped):
    segs = [(v, seg(rng, v)) for v in vocabs]
    prompt = " | ".join(" ".join(s) for _, s in segs) + " =>"
    outs = [[MAP[v](c) if v in mapped else c for c in s] for v, s in segs]
    return P(prompt, " | ".join(" ".join(o) for o in outs), [(v, " ".join(o)) for (v, _), o in zip(segs, outs)])
def held_in(rng, e):
    n = rng.randint(1, 3); vs = [e] + [rng.choice(list(V)) for _ in range(n - 1)]; rng.shuffle(vs)
    return example(rng, vs, {e})
def held_out(rng):
    vs = rng.sample(list(V), 3); return example(rng, vs, set(vs))

t0 = time.time()
rng = random.Random(0)
base = make_base_model(tok, HID, LAYERS, HEADS, seed=0)
pre = [example(rng, [rng.choice(list(V)) for _ in range(rng.randint(1, 3))], set()) for _ in range(4000)]
train_loop(base, tok, pre, steps=BASE_STEPS, batch_size=64, lr=3e-3, seed=0, weight_decay=0.01, progress=False)
base.eval()
print("base", round(time.time() - t0, 1), "s", flush=True)
test_out = [held_out(random.Random(f"t{i}")) for i in range(200)]
def seg_acc(answers, exs):
    hit = tot = 0
    for a, e in zip(answers, exs):
        got = [s.strip() for s in a.split("|")]
        for j, (_, want) in enumerate(e.segs):
            tot += 1; hit += j < len(got) and got[j] == want
    return hit / tot
print("base copy on held-out (segments right):", seg_acc(generate_answers(base, tok, [e.prompt for e in test_out], max_new_tokens=20), test_out))

from peft import LoraConfig, get_peft_model
from moerge.registry import Registry
import tempfile, shutil
tmp = tempfile.mkdtemp()
base.save_pretrained(f"{tmp}/base"); tok.save_pretrained(f"{tmp}/base")
reg = Registry(f"{tmp}/reg")
data = {}
for i, e in enumerate(V):
    t1 = time.time()
    r = random.Random(f"e{e}")
    train = [held_in(r, e) for _ in range(3000)]
    data[e] = [(x.prompt, x.target) for x in train]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], lora_dropout=0.0))
    train_loop(pm, tok, train, steps=EXP_STEPS, batch_size=64, lr=3e-3, seed=i, progress=False)
    val = [held_in(random.Random(f"v{e}{j}"), e) for j in range(100)]
    acc = sum(a == x.target for a, x in zip(generate_answers(pm, tok, [x.prompt for x in val], max_new_tokens=20), val)) / 100
    oacc = seg_acc(generate_answers(pm, tok, [x.prompt for x in test_out], max_new_tokens=20), test_out)
    pm.save_pretrained(f"{tmp}/lora/{e}")
    cfgp = f"{tmp}/lora/{e}/adapter_config.json"; c = json.load(open(cfgp)); c["base_model_name_or_path"] = f"{tmp}/base"; json.dump(c, open(cfgp, "w"))
    reg.register(f"{tmp}/lora/{e}", e, base=f"{tmp}/base", description=f"map {e}")
    print("expert", e, "held-in exact", acc, "held-out segments", round(oacc, 3), round(time.time() - t1, 1), "s", flush=True)

import moerge
from moerge.bench.diagnostics import routing_breakdown
names = list(V)
for router, cfg in (("phatgoose", {"steps": GATE_STEPS, "batch_size": 32 * ACCUM}), ("arrow", {})):
    t1 = time.time()
    m = moerge.compose(f"{tmp}/base", reg.select(names=names), router, data=data, progress=False, **cfg)
    ans = m.generate([e.prompt for e in test_out], max_new_tokens=20, batch_size=200)
    # per-token routing on inputs: own expert = vocabulary of each token
    ex = test_out[:50]
    routing = m.route([e.prompt for e in ex]); enc = m._encode([e.prompt for e in ex])
    from moerge.routers.base import Recorder
    rec = Recorder(); routing.hook.recorder = rec
    with m.routed(routing), torch.no_grad(): m.model(**enc)
    top = torch.stack([idx[..., 0] for _, idx, _ in rec.calls]).cpu()  # M,B,T
    ids = enc["input_ids"].cpu()
    id2v = {vocab[c]: names.index(v) for v in V for c in V[v]}
    want = torch.tensor([[id2v.get(int(t), -1) for t in row] for row in ids])
    sel = want >= 0
    racc = float((top[:, sel] == want[sel]).float().mean())
    print(router, "held-out segments", round(seg_acc(ans, test_out), 3), "input routing", round(racc, 3),
          "per layer", [round(float((top[k][sel] == want[sel]).float().mean()), 2) for k in range(0, top.shape[0], 7)], round(time.time() - t1, 1), "s", flush=True)
print("total", round(time.time() - t0, 1))
shutil.rmtree(tmp)
