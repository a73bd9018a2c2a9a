"""DeepSpeed ZeRO-2 across 2 "nodes" on localhost: two torchrun launchers (``--nnodes 2
--nproc-per-node 1 --rdzv-backend c10d``), each with its own working directory as its own disk,
2 training steps of the quickstart on the tiny VLM (gloo). The rehearsal docs/distributed.md
("DeepSpeed across machines") shows.

Checks: each process is LOCAL_RANK 0 of its own node, node ranks {0, 1}, world size 2; both ranks
end with bit-identical weights, equal to a one-node 2-process run with the same seed, and the
metrics of steps 1 and 2 equal too (timings aside); global rank 0's node holds the whole run
folder, the other node only its own checkpoint shards in an unfinished ``.tmp-step_*`` folder;
a relaunch there (each rank sees a different checkpoint) is refused on every rank instead of
resuming on one node and starting over on the other.
Wall time on 2 shared CPU cores: about 2 minutes (3 launches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.dist import run_torchrun
from helpers.nodes import run_nodes
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "node_train.py"
TIMING = ("_s",)  # per-rank wall-clock metrics (rollout_s, update_s, ...) differ from run to run


def overrides(steps: int) -> list[str]:
    # output_dir is relative: every node writes its run folder into its own working directory
    return [
        "output_dir=run",
        f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
        f"trainer.max_steps={steps}",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=3",
        "eval.num_samples=4",
        "task.num_train=64",
    ]


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.endswith(TIMING)} for line in lines]


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multinode")
    nodes = [tmp / "node0", tmp / "node1"]
    dumped = lambda: sum(len(list((n / "dump").glob("rank*.safetensors"))) for n in nodes) == 2  # noqa: E731
    config = ROOT / "configs" / "quickstart.yaml"
    run_nodes(nodes, [SCRIPT, "dump", config, *overrides(2)], timeout=400, done=dumped)
    single = tmp / "single"
    single.mkdir()
    run_torchrun(
        [SCRIPT, single / "dump", config, *overrides(2)[1:], f"output_dir={single / 'run'}"],
        nproc=2,
        timeout=400,
        done=lambda: len(list((single / "dump").glob("rank*.safetensors"))) == 2,
    )
    # the same launch again: rank 0's node holds checkpoint step 2, the other node none
    again = run_nodes(nodes, [SCRIPT, "again", config, *overrides(2)], timeout=300, retries=0, check=False)
    env = {}
    for node in nodes:
        for path in (node / "dump").glob("env_rank*.json"):
            env[node.name] = json.loads(path.read_text())
    return {"nodes": nodes, "single": single, "env": env, "again": again}


def node_of_rank(launches: dict, rank: int) -> Path:
    (name,) = [n for n, e in launches["env"].items() if e["RANK"] == str(rank)]
    return launches["nodes"][0].parent / name


def test_two_nodes_one_process_each(launches: dict) -> None:
    env = launches["env"]
    assert set(env) == {"node0", "node1"}  # one process on each node
    assert sorted(e["RANK"] for e in env.values()) == ["0", "1"]
    assert sorted(e["GROUP_RANK"] for e in env.values()) == ["0", "1"]  # the node ranks
    for e in env.values():
        assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["LOCAL_RANK"]) == ("2", "1", "0")
        assert e["RANK"] == e["GROUP_RANK"]  # one process per node


def test_ranks_agree_and_equal_one_node(launches: dict) -> None:
    r0 = load_file(str(node_of_rank(launches, 0) / "dump" / "rank0.safetensors"))
    r1 = load_file(str(node_of_rank(launches, 1) / "dump" / "rank1.safetensors"))
    one_node = load_file(str(launches["single"] / "dump" / "rank0.safetensors"))
    assert r0.keys() == r1.keys() == one_node.keys() and len(r0) > 10
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], one_node[k]), k
    from mmpo.models import load_model

    init = dict(load_model("tiny:qwen2_vl", seed=0)[0].named_parameters())
    assert any(not torch.equal(init[k].detach().float(), r0[k]) for k in r0 if k in init)  # it trained
    two = metrics(node_of_rank(launches, 0) / "run")
    assert [m["step"] for m in two] == [0, 1, 2]
    assert two == metrics(launches["single"] / "run")
    assert all(m["optimizer_steps"] > 0 for m in two[1:])


def test_rank0_node_writes_the_run_folder(launches: dict) -> None:
    main, other = node_of_rank(launches, 0) / "run", node_of_rank(launches, 1) / "run"
    assert {"config.yaml", "metrics.jsonl", "model/model.safetensors", "model/MANIFEST.json"} <= files(main)
    ckpt = "checkpoints/step_00000002/"
    assert {ckpt + "COMPLETE", ckpt + "trainer_state.json", ckpt + "rng_rank0.json"} <= files(main)
    # ZeRO-2: rank 0 writes the weights; each rank its own optimizer shard into the folder rank 0 made
    assert ckpt + "engine/deepspeed/mp_rank_00_model_states.pt" in files(main)
    assert ckpt + "engine/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in files(main)
    assert not any("rank_1" in f or "rank1" in f for f in files(main))  # rank 1's shards are on its own disk
    tmp = "checkpoints/.tmp-step_00000002/"
    assert files(other) == {
        tmp + "engine/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        tmp + "rng_rank1.json",
        tmp + "rng_rank1.safetensors",
    }


def test_a_resume_across_separate_disks_is_refused_on_every_rank(launches: dict) -> None:
    for node in launches["again"]:
        assert node.returncode != 0
        assert "the ranks see different checkpoints" in node.stdout
        # which node gets rank 0 is the rendezvous's choice, on this launch as on the first
        assert ": step 2, rank " in node.stdout or ": none, rank 1 on " in node.stdout
        assert "rank 1 on " in node.stdout and (": none)" in node.stdout or ": step 2)" in node.stdout)
    assert not list(launches["nodes"][0].glob("again/rank*.safetensors"))
    assert not list(launches["nodes"][1].glob("again/rank*.safetensors"))
