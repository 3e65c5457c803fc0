"""Load exported checkpoints the way a user without moe-lora would, in a process where moe_lora cannot be imported.

    python tests/export_child.py JOBS.json

JOBS.json: {"inputs": file with input_ids/attention_mask/prompt_ids (safetensors), "jobs": [{"name", "kind":
"causal" | "peft", "dir", "base" (peft: the saved base model directory), "out"}]}. For each job: load with
AutoModelForCausalLM.from_pretrained (failing on any missing, unexpected or mis-shaped key) or
PeftModel.from_pretrained (failing unless the adapter's LoRA tensors are exactly the file's), then write logits
on the batch, 20 greedy tokens and (MoE models) the router logits of every layer to ``out`` (safetensors).
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class _BlockMoELoRA(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moe_lora" or name.startswith("moe_lora."):
            raise ImportError(f"{name} is blocked: exported checkpoints must load without moe-lora")
        return None


sys.meta_path.insert(0, _BlockMoELoRA())


def main(jobs_file: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    try:
        import moe_lora  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("moe_lora could be imported in the child process")
    with open(jobs_file) as f:
        spec = json.load(f)
    inputs = load_file(spec["inputs"])
    for job in spec["jobs"]:
        if job["kind"] == "causal":
            model, info = AutoModelForCausalLM.from_pretrained(
                job["dir"], output_loading_info=True, dtype=torch.float32
            )
            bad = {k: sorted(v) for k, v in info.items() if v}
            if bad:
                raise SystemExit(f"{job['name']}: loading {job['dir']} reported {bad}")
        else:
            from peft import PeftModel
            from peft.utils import get_peft_model_state_dict

            base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
            model = PeftModel.from_pretrained(base, job["dir"])
            loaded = get_peft_model_state_dict(model)
            saved = load_file(f"{job['dir']}/adapter_model.safetensors")
            if set(loaded) != set(saved) or any(not torch.equal(loaded[k], saved[k]) for k in saved):
                raise SystemExit(f"{job['name']}: PEFT loaded {sorted(set(loaded) ^ set(saved))[:5]} differently")
        model.eval()
        out = {}
        with torch.no_grad():
            kw = {"output_router_logits": True} if job.get("router_logits") else {}
            res = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw)
            out["logits"] = res.logits.float().contiguous()
            if job.get("router_logits"):
                for i, r in enumerate(res.router_logits):
                    out[f"router_logits.{i}"] = r.float().contiguous()
            gen = model.generate(
                input_ids=inputs["prompt_ids"], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
            )
            out["generated"] = gen[:, inputs["prompt_ids"].shape[1] :].contiguous()
        save_file(out, job["out"])
        print(f"{job['name']}: {type(model).__name__} ok")


if __name__ == "__main__":
    main(sys.argv[1])
