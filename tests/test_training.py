"""The alignment loop on the micro miniature world: exact resume after SIGKILL, interrupted checkpoint
writes, one process vs two under accelerate, and the data edge cases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlm
from projector_training.config import TrainConfig
from projector_training.data import GlobalBatchSampler, load_records, malformed, record_to_messages, truncate
from projector_training.memory import candidate_micro_batches, fit_micro_batch
from projector_training.run import check_records, train
from projector_training.train import parse_args
from vlm.errors import ConfigError, VLMError
from vlm.processing.chat import IGNORE_INDEX, EncodedChat, normalize_messages, render_text


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    from projector_training.toy import ToyConfig, ensure_toy_world

    return ensure_toy_world(tmp_path_factory.mktemp("micro_world"), config=ToyConfig.micro(), log=lambda *_: None)


def _flags(world, out: Path, **overrides) -> list[str]:
    settings = {
        "lm": world.lm_dir,
        "vision-tower": world.vision_tower,
        "vision-backend": "open_clip",
        "data": world.train_json,
        "image-root": world.world_dir,
        "output-dir": out,
        "global-batch-size": 8,
        "micro-batch-size": 4,
        "max-steps": 8,
        "save-every": 2,
        "num-workers": 0,
        "device": "cpu",
        "mixed-precision": "no",
        "report-to": "none",
        "lr": 1e-3,
        "seed": 5,
        "compile-lm-layers": "false",  # the recipe compiles; the reference runs plain (one test compiles)
    }
    settings.update(overrides)
    return ["--recipe", "llava15-stage1-7b", *(f"--{k}={v}" for k, v in settings.items())]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _projector(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "projector.safetensors"))


def _train_subprocess(world, out: Path, **overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "projector_training", *_flags(world, out, **overrides)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def reference_run(micro_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _train_subprocess(micro_world, out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return out


def test_final_adapter_loads_and_summary_is_written(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["samples"] == 64 and summary["skipped"] == 0
    model = vlm.load(reference_run, device="cpu")
    assert model.config.vision_backend == "open_clip"
    assert (reference_run / "train_config.yaml").is_file()
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]


def test_sigkill_mid_epoch_then_resume_is_bit_exact(micro_world, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = _train_subprocess(micro_world, out)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000004" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "projector.safetensors").exists()  # it really died before the end
    resumed = _train_subprocess(micro_world, out)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    ours, reference = _projector(out), _projector(reference_run)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_interrupted_checkpoint_write_resumes_from_the_previous_one(
    micro_world, reference_run, tmp_path, monkeypatch, request
):
    cfg = parse_args(_flags(micro_world, tmp_path / "run"))
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if ".tmp-step-00000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the reference subprocess (OMP_NUM_THREADS=1): same float summation order
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".tmp-step-00000004").is_dir() and (checkpoints / "step-00000002").is_dir()
    monkeypatch.setattr(torch, "save", real_save)
    train(cfg)
    ours, reference = _projector(tmp_path / "run"), _projector(reference_run)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_two_processes_match_one_process(micro_world, reference_run, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.x runs `--cpu --num_processes 2` as ONE process (several CPU processes need mpirun and a
    # hostfile; `--cpu` and `--multi_gpu` exclude each other). `--multi_gpu` starts two through torchrun, which
    # train on the CPU (`--device cpu`: Accelerator(cpu=True), gloo); the log line says how many took part.
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "projector_training", *_flags(micro_world, out, **{"micro-batch-size": 4}),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "; 2 process(es)" in done.stdout + done.stderr, done.stdout + done.stderr
    ours, reference = _projector(out), _projector(reference_run)
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5


def _fsdp_on_cpu(micro_world, out: Path, **fsdp_overrides) -> subprocess.CompletedProcess:
    """The shipped FSDP config on 2 CPU processes (gloo), launched through tests/fsdp_on_cpu.py."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "accelerate" / "fsdp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    # The micro world's tower is open_clip, whose layers are ResidualAttentionBlocks.
    config["fsdp_config"].update(fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer,ResidualAttentionBlock")
    config["fsdp_config"].update(fsdp_overrides)
    config["fsdp_config"] = {k: v for k, v in config["fsdp_config"].items() if v is not None}
    config_file = out.parent / "fsdp-cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
        root / "tests" / "fsdp_on_cpu.py", *_flags(micro_world, out, **{"micro-batch-size": 4}),
    ]  # fmt: skip
    return subprocess.run(list(map(str, cmd)), env=_env(), capture_output=True, text=True, timeout=600)


def test_fsdp_config_shards_the_frozen_parts_and_matches_one_process(micro_world, reference_run, tmp_path):
    done = _fsdp_on_cpu(micro_world, tmp_path / "fsdp")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    units = re.search(r"FSDP: (\d+) sharded units", log)
    assert units and int(units.group(1)) >= 3, log  # the LM's 2 decoder layers, the tower's layer(s), the root
    ours, reference = _projector(tmp_path / "fsdp"), _projector(reference_run)
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5


def test_fsdp_without_the_ignored_projector_says_what_to_add(micro_world, tmp_path):
    done = _fsdp_on_cpu(micro_world, tmp_path / "fsdp", fsdp_ignored_modules=None)
    assert done.returncode != 0
    assert "add `fsdp_ignored_modules: projector`" in done.stdout + done.stderr


def test_compiled_lm_layers_train_the_same_projector(micro_world, reference_run, tmp_path, request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference subprocess (OMP_NUM_THREADS=1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    train(parse_args(_flags(micro_world, tmp_path / "compiled", **{"compile-lm-layers": "true"})))
    ours, reference = _projector(tmp_path / "compiled"), _projector(reference_run)
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-4


# --------------------------------------------------------------------------------------------------
# The micro-batch search (memory tries on the CPU: out-of-memory is simulated, the passes are real)


def test_micro_batch_search_halves_first_and_checkpoints_last():
    assert candidate_micro_batches(32, 256) == [32, 16, 8, 4, 2, 1]
    assert candidate_micro_batches(12, 48) == [12, 8, 4, 2, 1]
    assert candidate_micro_batches(6, 6) == [6, 2, 1]
    state = {"checkpointing": False, "enabled": 0, "tried": []}

    def enable():
        state["checkpointing"], state["enabled"] = True, state["enabled"] + 1

    def fits_below(limit, limit_checkpointed):
        def fits(batch):
            state["tried"].append((batch, state["checkpointing"]))
            if batch > (limit_checkpointed if state["checkpointing"] else limit):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return True

        return fits

    assert fit_micro_batch([16, 8, 4, 2, 1], fits_below(4, 16), enable, False, print) == (4, False)
    assert state["enabled"] == 0 and state["tried"] == [(16, False), (8, False), (4, False)]
    state["tried"].clear()
    assert fit_micro_batch([16, 8, 4, 2, 1], fits_below(0, 2), enable, False, print) == (2, True)
    assert state["enabled"] == 1 and state["tried"][5:] == [(16, True), (8, True), (4, True), (2, True)]
    with pytest.raises(ConfigError, match=r"fsdp\.yaml"):
        fit_micro_batch([2, 1], lambda b: False, enable, True, print)

    def broken(batch):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        fit_micro_batch([2, 1], broken, enable, False, print)


def test_auto_micro_batch_trains_the_same_projector(micro_world, reference_run, tmp_path, request, monkeypatch):
    """The real tries run (forward + backward of the longest samples); the card is simulated as fitting
    only micro-batches of 2 with gradient checkpointing. The run must then train at micro-batch 2 with
    checkpointing and land where micro-batch 4 without it did."""
    import projector_training.memory as memory
    import projector_training.run as train_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference subprocess (OMP_NUM_THREADS=1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    seen = {}
    original_forward = vlm.modeling.VisionLanguageModule.forward

    def forward(self, input_ids, *args, **kwargs):
        seen["batch"] = input_ids.shape[0]
        seen["checkpointing"] = self.lm.get_decoder().layers[0].training
        return original_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(vlm.modeling.VisionLanguageModule, "forward", forward)
    monkeypatch.setattr(train_module, "_can_probe", lambda accelerator, fsdp: True)
    monkeypatch.setattr(memory, "within_headroom", lambda device: seen["checkpointing"] and seen["batch"] <= 2)
    train(parse_args(_flags(micro_world, tmp_path / "auto", **{"save-every": 100})))
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert (summary["micro_batch_size"], summary["gradient_checkpointing"]) == (2, True)
    assert (seen["batch"], seen["checkpointing"]) == (2, True)  # what the training steps ran with
    ours, reference = _projector(tmp_path / "auto"), _projector(reference_run)
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-4


def test_out_of_memory_mid_run_says_how_to_continue(micro_world, tmp_path, monkeypatch):
    calls = []
    original_forward = vlm.modeling.VisionLanguageModule.forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # step 3's second micro-batch; step 2 was checkpointed
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(vlm.modeling.VisionLanguageModule, "forward", forward)
    with pytest.raises(VLMError, match=r"out of device memory at step 2 .*step-00000002.*--micro-batch-size 2"):
        train(parse_args(_flags(micro_world, tmp_path / "oom")))
    assert (tmp_path / "oom" / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()


def test_nonfinite_losses_are_skipped_then_abort(micro_world, tmp_path, caplog):
    """With a limit of 1, the first non-finite step is skipped and training goes on; the second one aborts."""
    cfg = parse_args(
        _flags(micro_world, tmp_path / "nan", lr=1e30, **{"max-nonfinite-steps": 1, "max-grad-norm": 1e30})
    )
    with caplog.at_level("INFO"), pytest.raises(VLMError, match=r"^2 steps had a non-finite loss .*\(limit 1\)"):
        train(cfg)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 2 and skipped[0].endswith("update skipped (1 so far)"), skipped


# --------------------------------------------------------------------------------------------------
# Data edge cases


def _record(*turns, image=None):
    record = {"id": "r", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        record["image"] = image
    return record


def _texts(messages):
    return [(m["role"], [p.get("text", "IMG") for p in m["content"]]) for m in messages]


def test_records_text_only_multi_turn_and_image_positions(tmp_path):
    root = tmp_path
    text_only = record_to_messages(_record(("human", "hi"), ("gpt", "hello")), root)
    assert _texts(text_only) == [("user", ["hi"]), ("assistant", ["hello"])]

    start = record_to_messages(_record(("human", "<image>\nWhat?"), ("gpt", "A."), image="a.png"), root)
    assert _texts(start)[0] == ("user", ["IMG", "What?"])
    end = record_to_messages(
        _record(("human", "Render a clear and concise summary of the photo.\n<image>"), ("gpt", "A."), image="a.png"),
        root,
    )
    assert _texts(end)[0] == ("user", ["Render a clear and concise summary of the photo.\n", "IMG"])
    rendered = render_text(normalize_messages(end, "S"), add_generation_prompt=False)
    assert "user\n<image>\nRender a clear and concise summary of the photo.<|im_end|>" in rendered  # as LLaVA trains

    two = record_to_messages(
        _record(("human", "<image> vs <image>"), ("gpt", "same"), ("human", "sure?"), ("gpt", "yes"), image=["a", "b"]),
        root,
    )
    assert [p["image"] for p in two[0]["content"] if p["type"] == "image"] == [root / "a", root / "b"]
    assert [m["role"] for m in two] == ["user", "assistant", "user", "assistant"]

    opening = record_to_messages(_record(("gpt", "Hello!"), ("human", "<image>\nQ"), ("gpt", "A"), image="a"), root)
    assert _texts(opening) == [("user", ["IMG", "Q"]), ("assistant", ["A"])]  # LLaVA drops the opening answer too
    assert malformed(_record(("system", "S"), ("gpt", "Hello!"), ("human", "Q"))).startswith("only an opening gpt")

    implicit = record_to_messages(_record(("system", "Be short."), ("human", "Q"), ("gpt", "A"), image="a"), root)
    assert _texts(implicit)[1] == ("user", ["IMG", "Q"])  # placed before the first human turn, as LLaVA does

    with pytest.raises(VLMError, match="2 <image> marks for 1 images"):
        record_to_messages(_record(("human", "<image><image>"), ("gpt", "x"), image="a"), root)


def test_json_and_jsonl_and_missing_images(tmp_path):
    records = [_record(("human", "<image>\nQ"), ("gpt", "A"), image=f"img{i}.png") for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert load_records(tmp_path / "d.json") == load_records(tmp_path / "d.jsonl") == records
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps(records), encoding="utf-8")
    assert load_records(tmp_path / "bom.json") == records
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"img{i}.png")
    assert len(check_records(records, tmp_path, 0.5, lambda *_: None)) == 3
    with pytest.raises(VLMError, match="1 with missing images"):
        check_records(records, tmp_path, 0.1, lambda *_: None)


def test_overlong_samples_truncate_outside_images_or_drop():
    image = 99
    chat = EncodedChat([1, 2, image, image, image, 3, 4, 5], [IGNORE_INDEX] * 5 + [3, 4, 5], ["a"])
    assert truncate(chat, 8, image) is chat
    cut = truncate(chat, 7, image)
    assert cut.input_ids == [1, 2, image, image, image, 3, 4] and cut.images == ["a"]
    assert truncate(chat, 4, image) is None  # the cut would split the image, and no label is left
    labelled_first = EncodedChat([1, 5, 6, image, image], [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX], ["a"])
    short = truncate(labelled_first, 4, image)
    assert short.input_ids == [1, 5, 6] and short.images == []


def test_dataset_skips_unreadable_images(micro_world, tmp_path):
    from projector_training.config import adapter_config
    from projector_training.data import ConversationDataset
    from vlm.api import build_model

    (tmp_path / "bad.png").write_text("not an image")
    records = [_record(("human", "<image>\nQ"), ("gpt", "A"), image="bad.png")]
    cfg = TrainConfig(lm=str(micro_world.lm_dir), vision_tower=micro_world.vision_tower, vision_backend="open_clip")
    model = build_model(adapter_config(cfg), device="cpu")
    assert ConversationDataset(records, tmp_path, model.processor, 64)[0] is None


def test_sampler_resume_and_sharding():
    lengths = list(range(40))
    full = GlobalBatchSampler(lengths, 8, 1, 0, 2, seed=1, epochs=2)
    batches = list(full)
    assert len(batches) == len(full) == 20 and all(len(b) == 4 for b in batches)
    assert list(GlobalBatchSampler(lengths, 8, 1, 0, 2, seed=1, epochs=2, start_step=3)) == batches[6:]
    ranks = [list(GlobalBatchSampler(lengths, 8, 2, r, 1, seed=1, epochs=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(ranks[0], ranks[1], strict=True)] == [
        sorted(batches[i] + batches[i + 1]) for i in range(0, 20, 2)
    ]


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision"):
        parse_args(["--recipe", "toy", "--mixed-precision", "fp8"])
    (tmp_path / "bad.yaml").write_text("colour: red\n")
    with pytest.raises(ConfigError, match="unknown training settings"):
        parse_args(["--recipe", "toy", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "ok.yaml").write_text("lr: 0.5\nepochs: 3\n")
    cfg = parse_args(["--recipe", "toy", "--config", str(tmp_path / "ok.yaml"), "--epochs", "4"])
    assert (cfg.lr, cfg.epochs) == (0.5, 4)


def test_help_describes_each_setting_from_its_docstring(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--auto-micro-batch BOOL On a GPU, before training: halve micro_batch_size" in text
    assert "--gradient-checkpointing BOOL Recompute the frozen LM's activations in backward" in text
    assert "--max-bad-fraction FLOAT Stop with an error when more than this share of samples is unusable." in text


def test_sigterm_stops_at_a_step_with_a_checkpoint_then_resume_is_bit_exact(micro_world, reference_run, tmp_path):
    """A scheduler's pre-emption (SIGTERM) loses no steps: the run checkpoints the step it is on and says how to go
    on; going on gives the uninterrupted run's projector."""
    out = tmp_path / "run"
    proc = _train_subprocess(micro_world, out)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000002" / "trainer_state.json").is_file():  # the loop is running
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, log
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 8, checkpoint (\S+); run the same command again", log)
    assert stopped, log
    assert Path(stopped[2]).name == f"step-{int(stopped[1]):08d}" and int(stopped[1]) < 8
    assert json.loads((Path(stopped[2]) / "trainer_state.json").read_text())["step"] == int(stopped[1])
    assert not (out / "projector.safetensors").exists()
    resumed = _train_subprocess(micro_world, out)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    ours, reference = _projector(out), _projector(reference_run)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


# --------------------------------------------------------------------------------------------------
# Nothing lost, nothing mixed up, no traceback for a user's mistake


def _checkpoint(run: Path, step: int) -> Path:
    path = run / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_a_new_run_never_mixes_with_an_old_runs_checkpoints(tmp_path):

    from projector_training.checkpoint import TrainState, latest_checkpoint, save_checkpoint

    old = tmp_path / "old"
    for step in (6, 8):
        _checkpoint(old, step)
    with pytest.raises(ConfigError, match="already holds checkpoints of another run"):
        train(TrainConfig(output_dir=str(old), resume="no"))  # refused before anything is loaded or written

    # Resumed from step 4 of a run that had gone on to 8: the checkpoints past the new one are a branch the run
    # left, which `--resume auto` must not pick up; older ones are pruned to `keep` as usual.
    for step in (2, 4):
        _checkpoint(old, step)
    projector = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    save_checkpoint(old, SimpleNamespace(projector=projector), optimizer, scheduler, TrainState(step=5), keep=2)
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(old).name == "step-00000005"


def test_yaml_values_mean_what_the_same_flags_mean(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text('lr: 2e-5\nresume: no\ngroup_by_length: "false"\nmax_grad_norm: 1\n')
    cfg = parse_args(["--recipe", "toy", "--config", str(config)])
    assert (cfg.lr, cfg.resume, cfg.group_by_length, cfg.max_grad_norm) == (2e-5, "no", False, 1.0)
    config.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs: 'many' is not a int"):
        parse_args(["--recipe", "toy", "--config", str(config)])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_grad_norm": -1.0}, "max_grad_norm > 0"),  # clipping to a negative norm flips the gradient
        ({"adam_beta2": 1.5}, "adam_beta2"),
        ({"num_workers": -1}, "must not be negative"),
        ({"max_steps": 0}, "max_steps must be at least 1"),
        ({"epochs": "2"}, "epochs must be a int"),
    ],
)
def test_settings_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_malformed_records_are_skipped_counted_and_named(tmp_path):
    good = [_record(("human", "Q"), ("gpt", "A")) for _ in range(6)]
    bad = [
        {"id": "none", "conversations": None},
        {"id": "string-turn", "conversations": ["hi"]},
        {"id": "null-value", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": None}]},
        {"id": "list-speaker", "conversations": [{"from": ["human"], "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Q"}]},
        {"id": "image-number", "image": 5, **_record(("human", "Q"), ("gpt", "A"))},
    ]
    logged = []
    assert check_records(good + bad, tmp_path, 0.5, logged.append) == good
    assert logged[0].startswith("skipping record 6 (id 'none'): no conversations list")
    assert "skipping 6 of 12 malformed records" in logged
    with pytest.raises(VLMError, match=r"6 of 12 records \(50.0%\) cannot be used \(6 malformed, 0 with missing"):
        check_records(good + bad, tmp_path, 0.4, logged.append)
    with pytest.raises(VLMError, match="a turn that is not"):  # never the text "None" as an answer
        record_to_messages(bad[2], tmp_path)


def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path):
    lines = [json.dumps(_record(("human", "Q"), ("gpt", "A")))] * 9 + ['{"id": "broken", ']
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    with pytest.raises(VLMError, match=r"d.jsonl:10: not a JSON object"):
        load_records(tmp_path / "d.jsonl")
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(VLMError, match="is not UTF-8 text"):
        load_records(tmp_path / "latin1.json")


def test_init_projector_from_an_unfinished_run_says_so(tmp_path):
    from projector_training.run import init_projector

    model = SimpleNamespace(projector=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"no projector\.safetensors there"):
        init_projector(model, TrainConfig(init_projector=str(tmp_path)))


def test_init_projector_none_clears_a_recipes_starting_point():
    from projector_training.run import init_projector

    cfg = parse_args(["--recipe", "stage2-frozen-lm-7b", "--init-projector", "none"])
    model = SimpleNamespace(projector=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    init_projector(model, cfg)  # a fresh seeded projector; no `runs/llava15-stage1-7b` needed
    torch.manual_seed(cfg.seed)
    assert torch.equal(model.projector[0].weight, torch.nn.Linear(2, 2).weight)


def test_an_overflowed_gradient_is_skipped_not_spread_into_the_weights(micro_world, tmp_path, monkeypatch):
    """A finite loss with an inf gradient (a bf16 backward overflow): clipping would make every weight NaN."""
    import projector_training.run as training

    init = training.init_projector

    def init_with_one_overflow(model, cfg):
        init(model, cfg)
        fired = []
        model.projector[0].weight.register_hook(lambda g: g if fired else fired.append(1) or g * float("inf"))

    monkeypatch.setattr(training, "init_projector", init_with_one_overflow)
    run = train(parse_args(_flags(micro_world, tmp_path / "run", **{"max-steps": 2})))
    assert json.loads((run / "summary.json").read_text())["nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in _projector(run).values())


def test_resuming_with_a_lower_learning_rate_uses_it(micro_world, tmp_path, monkeypatch):
    """What the non-finite guard advises: the checkpoint's optimiser state comes back, and this run's lr, betas, eps
    and weight decay are the ones its steps use (observed at each AdamW step, against an uninterrupted run)."""
    used: list[dict] = []
    step = torch.optim.AdamW.step

    def observed_step(self, *args, **kwargs):
        used.append({k: self.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", observed_step)
    train(parse_args(_flags(micro_world, tmp_path / "reference", **{"max-steps": 4})))
    reference, used[:] = list(used), []
    out = tmp_path / "run"
    train(parse_args(_flags(micro_world, out, **{"max-steps": 2})))
    assert used == reference[:2]
    used.clear()
    new = {"max-steps": 4, "lr": 1e-5, "adam-beta1": 0.8, "adam-beta2": 0.99, "adam-eps": 1e-6, "weight-decay": 0.01}
    train(parse_args(_flags(micro_world, out, **new)))
    assert len(used) == 2 and reference[2]["lr"] > 0  # steps 3 and 4, resumed
    for ours, theirs in zip(used, reference[2:], strict=True):
        assert ours["lr"] == pytest.approx(theirs["lr"] * 1e-5 / 1e-3)  # the same schedule, from the new lr
        assert (ours["betas"], ours["eps"], ours["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.01)
    groups = torch.load(out / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)["param_groups"]
    scheduler = torch.load(out / "checkpoints" / "step-00000004" / "scheduler.pt", weights_only=True)
    assert {g["initial_lr"] for g in groups} == {1e-5} and scheduler["base_lrs"] == [1e-5]


def test_a_short_run_with_no_usable_sample_fails_and_says_why(micro_world, tmp_path):
    with pytest.raises(VLMError, match=r"none of the 16 samples could be used .*max_length=8"):
        train(parse_args(_flags(micro_world, tmp_path / "run", **{"max-steps": 2, "max-length": 8})))
    assert not (tmp_path / "run" / "projector.safetensors").exists()


def test_resuming_under_other_data_or_batching_is_refused(micro_world, tmp_path):
    """A checkpoint continues only the sample order it was written in; the refused run leaves the old run's files."""
    out = tmp_path / "run"
    train(parse_args(_flags(micro_world, out, **{"max-steps": 2})))
    settings = (out / "train_config.yaml").read_text()
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(load_records(micro_world.train_json)[:-8]))
    reformatted = tmp_path / "reformatted.jsonl"
    reformatted.write_text("".join(json.dumps(r) + "\n" for r in load_records(micro_world.train_json)))
    for changes, message in [
        ({"seed": 6}, r"seed was 5, now 6"),
        ({"global-batch-size": 4}, r"global_batch_size was 8, now 4"),
        ({"data": fewer}, r"the usable training records differ \(288 then, 280 now\)"),
        ({"group-by-length": "false"}, r"group_by_length was True, now False"),
    ]:
        with pytest.raises(ConfigError, match=rf"step-00000002 belongs to a run with other data .*{message}"):
            train(parse_args(_flags(micro_world, out, **{"max-steps": 4, **changes})))
    assert (out / "train_config.yaml").read_text() == settings
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    train(parse_args(_flags(micro_world, out, **{"max-steps": 4, "data": reformatted})))  # the same records
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_missing_data_file_is_named_before_any_model_loads(tmp_path):
    cfg = TrainConfig(lm=str(tmp_path / "no-lm"), data=str(tmp_path / "nope.json"), output_dir=str(tmp_path / "run"))
    with pytest.raises(VLMError, match="training data file not found"):  # not an error about the missing LM
        train(cfg.replace(device="cpu", mixed_precision="no", report_to="none"))


def test_sample_lengths_are_measured_in_english_and_chinese(text_model, rgb_images):
    """The lengths that pick the micro-batch search's longest samples are the samples' real token counts, in any
    language: characters / 4 guessed a 280-character Chinese answer at 70 tokens (CausalLM's vocabulary: about 170).
    Measured on the tiny BPE and on CausalLM's real vocabulary."""
    from projector_training.data import ConversationDataset

    image = rgb_images[0].name
    records = [
        _record(
            ("human", "<image>\nWhat is in the picture?"), ("gpt", "A red circle on a white background."), image=image
        ),
        _record(("human", "<image>\n图中有什么？"), ("gpt", "白色背景上有一个红色的圆形。" * 20), image=image),
        _record(
            ("human", "描述 the image 一下"),
            ("gpt", "一个 red circle，在 white 背景上。"),
            ("human", "再说一遍？"),
            ("gpt", "好的"),
        ),
        {"id": "broken", "conversations": "not a list"},
    ]
    dataset = ConversationDataset(records, rgb_images[0].parent, text_model.processor, max_length=100_000)
    for index in range(3):
        sample = dataset[index]
        assert dataset.length(index) == len(sample.input_ids), records[index]
        chars = sum(len(t["value"]) for t in records[index]["conversations"])
        guess = chars // 4 + (text_model.num_image_tokens if "image" in records[index] else 0)
        if index == 1:
            assert guess < len(sample.input_ids) / 2  # the old guess, far below on Chinese
    assert dataset[3] is None and dataset.length(3) == 0  # a malformed record: no turns to count, dropped anyway
