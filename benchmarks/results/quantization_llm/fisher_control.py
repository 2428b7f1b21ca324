"""Control for fisher_mixed on the LLM-shaped student: the same number of MatMuls kept in float
(23 of 56), chosen by the Fisher ranking, by unweighted weight error, and at random (3 seeds)."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from compressor import artifact as art
from compressor.data import prepare
from compressor.data.vocab import ItemVocab
from compressor.modeling import load_model
from compressor.quantize import weight_matmuls
from compressor.quantize_budget import PLAIN, QuantizeConfig, Search
from compressor.quantize_sensitivity import SIMULATED, matmul_parameters

adir, mdir, out = Path("/tmp/q30/llmr/student"), "/tmp/q30/llmr/student_model", Path(sys.argv[1])
res = json.loads(Path("/tmp/q30/bench_llm_student/results.json").read_text())["models"]["student"]
fm = res["methods"]["fisher_mixed"]
k = len(fm["kept_float"])
data = prepare("ml-latest-small", vocab=ItemVocab.load(adir))
valid = data.split("valid")
cfg = QuantizeConfig()
judged = valid.subset(cfg.users, cfg.seed)
model = load_model(mdir)[0]
fpath = adir / art.MODEL_ONNX
nodes = weight_matmuls(onnx.load(str(fpath), load_external_data=False))
params = matmul_parameters(fpath, model)
named = dict(model.named_parameters())
plain_err = {n: float(((named[p].detach().numpy() - SIMULATED["int8"](named[p].detach().numpy(), True, 32)) ** 2).sum()) for n, p in params.items()}
work = Path("/tmp/q30/control_work")
work.mkdir(exist_ok=True)
s = Search(fpath, work, judged, judged, np.load(adir / art.EMBEDDINGS), None, 20, cfg, None, print)
orders = {"fisher": fm["kept_float"],
          "weight_error_unweighted": sorted(nodes, key=lambda n: -plain_err[n])[:k]}
for seed in range(3):
    orders[f"random_seed{seed}"] = list(np.random.default_rng(seed).permutation(nodes)[:k])
rows = {}
for name, keep in orders.items():
    r = s.judge(s.quantize(PLAIN["int8"], work / f"{name}.onnx", keep))
    rows[name] = {"kept": len(keep), "topk_agreement": r["topk_agreement"], "ndcg@10": r["ndcg@10"], "passed": r["passed"]}
    print(name, rows[name], flush=True)
doc = {"what": __doc__, "base": "int8 (dynamic, per channel)", "k": k, "users": len(judged), "rows": rows,
       "overlap_fisher_vs_unweighted": len(set(orders["fisher"]) & set(orders["weight_error_unweighted"]))}
out.write_text(json.dumps(doc, indent=2))
