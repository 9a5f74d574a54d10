"""Bad input is one line before any model loads (docs/errors.md lists every case): exit status 2,
a single line naming the field or file, no traceback, no model loaded, no run folder made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rewards.registry

from align.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


#: (id, command, what the line must name) -- docs/errors.md has the same table
CASES = [
    ("negative clip_range", ["train", "flow_grpo", "ppo.clip_range=-1"], "clip_range must be > 0"),
    ("negative adv_clip", ["train", "flow_grpo", "ppo.adv_clip=-2"], "adv_clip must be > 0"),
    ("negative learning rate", ["train", "flow_grpo", "optim.lr=-1e-4"], "optim.lr must be > 0"),
    ("negative kl_beta", ["train", "dense_grpo", "ppo.kl_beta=-0.1"], "kl_beta must be >= 0"),
    ("zero iterations", ["train", "flow_grpo", "iterations=0"], "iterations must be > 0"),
    ("zero inner epochs", ["train", "flow_grpo", "ppo.inner_epochs=0"], "inner_epochs must be > 0"),
    ("zero batch size", ["train", "flow_grpo", "train_batch_size=0"], "train_batch_size must be > 0"),
    ("zero eval samples", ["train", "flow_grpo", "eval.per_prompt=0"], "eval.per_prompt must be > 0"),
    ("negative noise level", ["train", "flow_grpo", "rollout.kernel_params={noise_level: -0.5}"],
     "rollout.kernel_params.noise_level must be > 0"),
    ("mistyped kernel parameter", ["train", "flow_grpo", "rollout.kernel_params={noise_levl: 0.5}"],
     "rollout.kernel_params: unknown parameter of step kernel 'flow_grpo' 'noise_levl' (did you mean 'noise_level'"),
    ("kernel of the wrong family", ["train", "flow_grpo", "rollout.kernel=ddim"],
     "rollout.kernel: step kernel 'ddim' is for ddpm models; 'toy' is a flow model"),
    ("empty prompts", ["train", "flow_grpo", "prompts=[]"], "prompts is empty"),
    ("empty eval prompts", ["train", "flow_grpo", "eval_prompts=[]"], "eval_prompts is empty"),
    ("sample: zero samples", ["sample", "--num", "0"], "num_per_prompt must be >= 1"),
    ("sample: negative steps", ["sample", "--steps", "-3"], "rollout.num_steps must be >= 1"),
    ("reward backprop on a black-box reward", ["train", "reward_backprop", "rewards=[jpeg_compressibility]"],
     "rewards[0]: reward 'jpeg_compressibility' is not differentiable"),
    ("dpo: missing pair file", ["train", "dpo", "pairs=missing.jsonl"], "pairs: file not found: missing.jsonl"),
    ("fp8 without its stack", ["train", "flow_grpo", "run.mixed_precision=fp8", "model.device=cpu"],
     "run.mixed_precision: fp8 runs on CUDA devices only"),
    ("guidance: mistyped reward", ["sample", "--guide", "stroke_thicknes=300"],
     "guidance.rewards[0]: unknown reward 'stroke_thicknes'"),
    ("guidance: not a weight", ["sample", "--guide", "stroke_thickness=heavy"],
     "--guide 'stroke_thickness=heavy': the weight 'heavy' is not a number"),
    ("guidance: process weight without guidance", ["train", "flow_grpo", "process_weight=0.5"],
     "process_weight needs guidance.rewards"),
    ("cfg_split with a full CFG gradient", ["train", "flow_grpo", "ppo.cfg_grad=full"],
     "rollout.cfg_split needs ppo.cfg_grad: cond_only"),
    ("rollout graphs with several minibatches", ["train", "flow_grpo", "reuse_rollout_graph=true", "train_batch_size=4"],
     "reuse_rollout_graph: it needs one minibatch per update"),
    ("max_batch with fully_shard", ["train", "flow_grpo", "run.fully_shard=true", "rollout.max_batch=4"],
     "rollout.max_batch: with run.fully_shard every model call is collective"),
    ("8-bit optimizer with fully_shard", ["train", "flow_grpo", "run.fully_shard=true", "optim.name=adamw8bit"],
     "optim.name adamw8bit: bitsandbytes' 8-bit states are not sharded; it is not supported with run.fully_shard"),
    ("unknown optimizer", ["train", "flow_grpo", "optim.name=adamw8bt"],
     "optim.name: unknown optimizer 'adamw8bt' (did you mean 'adamw8bit'? valid: adamw, adamw8bit)"),
    ("EMA with fully_shard", ["train", "flow_grpo", "run.fully_shard=true", "optim.ema_decay=0.9"],
     "optim.ema_decay: the EMA keeps whole copies of the weights; it is not supported with run.fully_shard"),
    ("guidance: unknown form", ["train", "flow_grpo", "guidance.rewards=[digit]", "guidance.form=normalised"],
     "guidance.form must be one of"),
    ("search: zero candidates", ["search", "--num", "0"], "num_candidates and top_k must be >= 1"),
    ("search: top-k above the candidates", ["search", "--num", "2", "--top-k", "4"],
     "top_k=4 is more than num_candidates=2"),
    ("search: a fraction per step", ["search", "prune_steps=[1,2]"], "prune_steps has 2 steps for 3 keep_fractions"),
    ("search: a step past the sampler", ["search", "--steps", "10", "prune_steps=[1,4,12]"],
     "prune_steps has step 12 outside 0..9"),
    ("search: mistyped reward", ["search", "--reward", "digt"], "rewards[0]: unknown reward 'digt'"),
    ("one entry of a list", ["train", "--config", str(ROOT / "configs" / "methods" / "adv_grpo.yaml"),
                             "rewards[0].lr=0.1"], "rewards: a list is replaced whole"),
    ("unknown attention backend", ["train", "flow_grpo", "model.attention_backend=flsh"],
     "model.attention_backend: unknown attention backend 'flsh' (did you mean 'flash'"),
    ("attention backend without its package", ["train", "flow_grpo", "model.attention_backend=_native_npu"],
     "model.attention_backend: '_native_npu' cannot run here"),
    ("guidance below the model's smallest scale", ["train", "flow_grpo", "model.name=z_image", "rollout.guidance_scale=0"],
     "rollout.guidance_scale: 0 is below 1, the smallest scale the 'z_image' model takes"),
    ("mistyped expert choice", ["train", "flow_grpo", "model.name=wan22", "model.train_experts=low"],
     "model.train_experts: unknown expert choice 'low' (did you mean 'low_noise'"),
    ("an expert choice for a one-denoiser model", ["train", "flow_grpo", "model.train_experts=low_noise"],
     "model.train_experts: 'low_noise' needs a model with several experts"),
    ("low-noise guidance for a one-denoiser model", ["train", "flow_grpo", "model.guidance_scale_2=3"],
     "model.guidance_scale_2: the low-noise expert's CFG scale of Wan 2.2 A14B (wan22)"),
    ("one expert fully fine-tuned on shards", ["train", "flow_grpo", "model.name=wan22", "model.train_experts=low_noise",
                                               "lora.enabled=false", "run.fully_shard=true"],
     "model.train_experts: full fine-tuning of one expert (lora.enabled=false) is not supported on sharded weights"),
    ("sweep: mistyped method", ["sweep", str(ROOT / "configs" / "sweeps" / "methods.yaml"), "methods=[flow_gpro]"],
     "methods: unknown method preset 'flow_gpro' (did you mean 'flow_grpo'"),
    ("sweep: mistyped key", ["sweep", str(ROOT / "configs" / "sweeps" / "methods.yaml"), "seed=[0]"],
     "unknown config key 'seed' (did you mean 'seeds'"),
    ("sweep: mistyped trial setting", ["sweep", str(ROOT / "configs" / "sweeps" / "methods.yaml"),
                                       "overrides={optim.lrr: 0.1}"], "optim.lrr"),
    ("reward: local file not found", ["train", "flow_grpo", "rewards=[{name: aesthetic, head_path: /nowhere/head.pth}]"],
     "rewards[0]: aesthetic.head_path: file not found: /nowhere/head.pth"),
    ("reward: mistyped option", ["train", "flow_grpo", "rewards=[{name: digit, weigths: x}]"],
     "rewards[0]: unknown option of reward 'digit' 'weigths' (did you mean 'weights'"),
]

#: the other commands' bad input: (id, argv with {tmp} for a scratch folder, what the line must name)
COMMAND_CASES = [
    ("label: zero pairs", ["label", "--out", "{tmp}/labels", "--pairs", "0"], "--pairs must be >= 1, got 0"),
    ("label: mistyped model", ["label", "--out", "{tmp}/labels", "model.name=toyy"],
     "model.name: unknown model 'toyy' (did you mean 'toy'"),
    ("label: --out is a file", ["label", "--out", "{tmp}/notes.txt"], "--out: {tmp}/notes.txt is a file, not a folder"),
    ("serve-reward: mistyped reward", ["serve-reward", "digt"], "unknown reward 'digt' (did you mean 'digit'"),
    ("serve-reward: mistyped option", ["serve-reward", "digit", "-o", "weigths=x"],
     "unknown option of reward 'digit' 'weigths'"),
    ("serve-reward: port out of range", ["serve-reward", "digit", "--port", "70000"],
     "--port must be in 1..65535, got 70000"),
    ("serve-reward: zero batch", ["serve-reward", "digit", "--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    ("launch: mistyped preset", ["launch", "multi_gpuu", "train", "flow_grpo"],
     "launch: unknown accelerate preset 'multi_gpuu' (did you mean 'multi_gpu'"),
    ("launch: mistyped command", ["launch", "multi_cpu", "trian", "flow_grpo"],
     "launch: unknown command 'trian' (did you mean 'train'"),
    ("launch: no command", ["launch", "multi_cpu"], "launch: give the command to run"),
    ("launch: a bad training value", ["launch", "multi_cpu", "train", "flow_grpo", "optim.lr=-1"],
     "optim.lr must be > 0"),
    ("score: mistyped reward", ["score", "--reward", "digt", "--images", "{tmp}/images", "--prompt", "a red digit 7"],
     "unknown reward 'digt' (did you mean 'digit'"),
    ("score: no images folder", ["score", "--reward", "digit", "--images", "{tmp}/nowhere", "--prompt", "x"],
     "no images folder at {tmp}/nowhere"),
    ("score: no prompts", ["score", "--reward", "digit", "--images", "{tmp}/images"],
     "no prompts: give --prompts FILE or --prompt TEXT"),
    ("demo: port out of range", ["demo", "--port", "0"], "--port must be in 1..65535, got 0"),
    ("demo: --runs not a folder", ["demo", "--runs", "{tmp}/nowhere"], "--runs: {tmp}/nowhere is not a folder"),
    ("demo: mistyped reward option", ["demo", "--reward-option", "aesthetic.hed_path=x"],
     "--reward-option: unknown option of reward 'aesthetic' 'hed_path' (did you mean 'head_path'"),
    ("demo: reward file not found", ["demo", "--reward-option", "aesthetic.head_path=/nowhere/head.pth"],
     "--reward-option: aesthetic.head_path: file not found: /nowhere/head.pth"),
    ("eval: not a run folder", ["eval", "{tmp}/nowhere"], "align eval: {tmp}/nowhere is not a run folder (no run.json)"),
    ("sweep report: no finished trial", ["sweep", "report", "{tmp}"], "holds no finished trial"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    import pipelines.registry

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipelines.registry, "load_adapter", refuse)


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "run"
    if args[0] == "train":
        argv = [*args, f"run.output_dir={out}"]
    elif args[0] == "sweep":
        argv = [*args, f"out={out}"]
    else:
        argv = [*args, "--out", str(out)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err, out


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_before_loading(case, args, expected, tmp_path, capsys, no_model_load):
    code, err, out = run_cli(args, tmp_path, capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("case, args, expected", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_every_command_says_bad_input_in_one_line(case, args, expected, tmp_path, capsys, no_model_load, monkeypatch):
    """label, serve-reward, launch, score, demo, eval and sweep report: exit 2 and one line, before any
    model, server, demo or process starts."""
    import subprocess

    import demos.app
    import rewards.server

    def refuse(*args, **kwargs):
        raise AssertionError("it started anyway")

    for module, name in ((rewards.server, "serve"), (rewards.server, "serve_on_ray"), (demos.app, "launch"),
                         (subprocess, "call"), (rewards.registry, "build_rewards")):
        monkeypatch.setattr(module, name, refuse)
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "0.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "labels").exists()


def test_print_config_runs_the_same_validation(tmp_path, capsys, no_model_load):
    assert main(["train", "flow_grpo", "--print-config", "ppo.adv_clip=-1"]) == 2
    assert "adv_clip must be > 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_unavailable_device_is_one_line(tmp_path, capsys, no_model_load):
    for args in (["train", "flow_grpo", "model.device=cuda"], ["sample", "--device", "cuda:0"]):
        code, err, _ = run_cli(args, tmp_path, capsys)
        assert code == 2 and "model.device:" in err and "not available" in err and "\n" not in err


@pytest.mark.parametrize("text, expected", [
    ("a: [1, 2\nb: 3\n", "malformed YAML at line 2"),
    ("- rollout\n- rewards\n", "expected a mapping of config keys, got a list"),
    ("rollout: [1, 2]\n", "rollout: expected a mapping of RolloutConfig keys, got list"),
    ("guidance: {on: latents}\n", 'config key guidance.True: YAML reads a bare on / off as true / false; quote the key: "on"'),
])
def test_bad_config_files_name_the_file(text, expected, tmp_path, capsys, no_model_load):
    path = write(tmp_path, "config.yaml", text)
    code, err, _ = run_cli(["train", "flow_grpo", "--config", path], tmp_path, capsys)
    assert code == 2 and expected in err and "\n" not in err, err
    if "malformed YAML" in expected or "got a list" in expected:
        assert path in err


def test_a_folder_holding_another_trainers_run_is_refused(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"trainer": "dense_grpo"}))
    assert main(["train", "flow_grpo", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir:" in err and "holds a dense_grpo run" in err
    (tmp_path / "file").write_text("x")
    assert main(["train", "flow_grpo", f"run.output_dir={tmp_path / 'file'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_reward_that_scores_nothing_stops_with_one_line(tmp_path, capsys):
    """OCR with evaluation prompts that quote no text: the baseline evaluation scores nothing, and
    the run stops with one line naming the reward instead of ending `reward before=nan`."""
    code = main(["train", "flow_grpo", "rewards=[ocr]", "eval_prompts=['a red digit 3']", "iterations=1",
                 "eval.per_prompt=1", "rollout.num_steps=2", f"run.output_dir={tmp_path / 'run'}",
                 "run.log_with=none", "run.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "(ocr) could score none of the 1 evaluation samples" in err, err


def test_errors_doc_lists_every_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case, _, expected in CASES + COMMAND_CASES:
        assert case in doc, case


def lora_folder(path, rank_in_config=4, rank=4, features=16):
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"layer.lora_A.weight": torch.randn(rank, features), "layer.lora_B.weight": torch.randn(features, rank)},
              str(path / "lora.safetensors"))
    (path / "lora_config.json").write_text(json.dumps({"r": rank_in_config, "lora_alpha": 8,
                                                       "target_modules": ["layer"]}))
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: the file cases below, by the name docs/errors.md gives them
FILE_CASES = ["sample: corrupt LoRA folder", "sample: LoRA of another rank", "sample: LoRA of another model",
              "sample: --out is a file", "sample: --out not writable", "score: corrupt or truncated image",
              "score: zero batch size"]


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "lora.safetensors is not readable safetensors (corrupt or truncated"),
    ("truncate", "lora.safetensors is not readable safetensors (corrupt or truncated"),
    ("rank", "layer.lora_A.weight has rank 4, but lora_config.json says r=8"),
    ("no config", "lora_config.json is missing or not a JSON mapping"),
    ("no weights", "has no lora.safetensors or pytorch_lora_weights.safetensors"),
])
def test_a_bad_lora_folder_is_one_line_before_loading(damage, expected, tmp_path, capsys, no_model_load):
    folder = lora_folder(tmp_path / "lora", rank_in_config=8 if damage == "rank" else 4)
    if damage == "garbage":
        (folder / "lora.safetensors").write_bytes(b"not a tensor file")
    elif damage == "truncate":
        truncate(folder / "lora.safetensors")
    elif damage == "no config":
        (folder / "lora_config.json").unlink()
    elif damage == "no weights":
        (folder / "lora.safetensors").unlink()
    code, err, out = run_cli(["sample", "--lora", str(folder)], tmp_path, capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"model.lora: LoRA folder {folder}: {expected}" in err, err
    assert not out.exists()


def test_a_lora_of_another_model_is_one_line(tmp_path, capsys):
    """Layer names of the toy model, sizes of another: peft's size mismatch, said in one line, and
    the toy model is left without the half-attached LoRA."""
    from pipelines.toy import TOY_WEIGHTS_DIR

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    from align.models import ModelConfig, load_model

    adapter = load_model(ModelConfig(name="toy"))
    name, layer = next((n, m) for n, m in adapter.base_denoiser.named_modules() if isinstance(m, torch.nn.Linear))
    folder = tmp_path / "lora"
    folder.mkdir()
    from safetensors.torch import save_file

    wrong = layer.in_features + 3
    save_file({f"{name}.lora_A.weight": torch.randn(4, wrong), f"{name}.lora_B.weight": torch.randn(layer.out_features, 4)},
              str(folder / "lora.safetensors"))
    (folder / "lora_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": [name]}))
    code, err, out = run_cli(["sample", "--lora", str(folder), "--steps", "2", "--num", "1"], tmp_path, capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"model.lora: LoRA folder {folder} does not fit this toy model: size mismatch" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="does not fit"):
        adapter.load_lora(folder)
    assert adapter.lora_names() == []


def test_sample_out_must_be_a_writable_folder(tmp_path, capsys, monkeypatch, no_model_load):
    import align.training.run_folder

    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    for out, expected in ((notes, f"--out: {notes} is a file, not a folder"),
                          (notes / "grid", f"--out: {notes} is a file, so {notes / 'grid'} cannot be made")):
        assert main(["sample", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, err
    # (root may write anywhere: the permission answer is what the check asks)
    monkeypatch.setattr(align.training.run_folder.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert main(["sample", "--out", str(tmp_path / "new")]) == 2
    assert f"--out: {tmp_path} is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_score_names_a_corrupt_image_before_any_reward_loads(damage, tmp_path, capsys, monkeypatch):
    import rewards.registry
    from PIL import Image

    def refuse(*args, **kwargs):
        raise AssertionError("a reward was built")

    monkeypatch.setattr(rewards.registry, "build_rewards", refuse)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(images / f"{i:04d}.png")
    bad = images / "0001.png"
    if damage == "garbage":
        bad.write_bytes(b"\x89PNG not really")
    else:
        truncate(bad)
    code = main(["score", "--reward", "jpeg_compressibility", "--images", str(images), "--prompt", "a cat"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"{bad}: not a readable image (" in err, err


def test_score_batch_size_must_be_positive(tmp_path, capsys):
    assert main(["score", "--reward", "jpeg_compressibility", "--images", str(tmp_path), "--prompt", "x",
                 "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--batch-size must be >= 1, got 0" in err


def test_errors_doc_lists_every_file_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in FILE_CASES:
        assert f"| {case} |" in doc, case


#: the model-folder cases, by the name docs/errors.md gives them
MODEL_FOLDER_CASES = ["model: path not found", "model: not a pipeline folder", "model: another family's folder",
                      "model: missing component"]
#: adapter name -> the pipeline class its folders hold
FOLDER_CLASSES = {"qwen_image": "QwenImagePipeline", "flux2": "Flux2Pipeline", "flux2_klein": "Flux2KleinPipeline",
                  "z_image": "ZImagePipeline", "wan22": "WanPipeline", "hunyuan_video15": "HunyuanVideo15Pipeline",
                  "hunyuan_video15_i2v": "HunyuanVideo15ImageToVideoPipeline", "sd3": "StableDiffusion3Pipeline",
                  "flux": "FluxPipeline", "wan": "WanPipeline"}


#: the pipeline config that tells a family's folder from another's of the same class
FOLDER_CONFIG = {"wan22": {"boundary_ratio": 0.875}}


def model_folder(tmp_path, pipeline_class: str, *, drop: str | None = None, config: dict | None = None) -> Path:
    """A folder with the model_index.json of ``pipeline_class`` (and the pipeline ``config``) and an
    empty folder per component (without ``drop``'s): what the pre-load check reads, nothing loadable."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    expected, _ = cls._get_signature_keys(cls)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline_class, **(config or {}), **{name: ["diffusers", "Anything"] for name in expected}}))
    for name in expected:
        if name != drop:
            (folder / name).mkdir()
    return folder


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("damage", ["missing", "no index", "other family", "missing component"])
@pytest.mark.parametrize("model", sorted(FOLDER_CLASSES))
def test_a_bad_model_folder_is_one_line_before_loading(model, damage, command, tmp_path, capsys, no_model_load):
    """A wrong model.path, a folder that is no pipeline, a pipeline of another family (naming the
    adapter that loads it) or a folder without a component its pipeline needs: one line, exit 2,
    nothing loaded and no run folder left behind."""
    if damage == "missing":
        folder, expected = tmp_path / "nowhere", f"model.path: {tmp_path / 'nowhere'} not found"
    elif damage == "no index":
        folder = tmp_path / "model"
        folder.mkdir()
        expected = "has no model_index.json: not a diffusers pipeline folder"
    elif damage == "other family":
        other = "ZImagePipeline" if model != "z_image" else "FluxPipeline"
        folder = model_folder(tmp_path, other)
        owner = "z_image" if other == "ZImagePipeline" else "flux"
        expected = f"holds a {other}, not a {model} model"
        assert f"use model.name={owner}" in _cli_error([command, f"model.name={model}", f"model.path={folder}"],
                                                       tmp_path, capsys, command)
        return
    else:
        folder = model_folder(tmp_path, FOLDER_CLASSES[model], drop="transformer", config=FOLDER_CONFIG.get(model))
        expected = "lacks the folder transformer/ that its model_index.json names"
    err = _cli_error([command, f"model.name={model}", f"model.path={folder}"], tmp_path, capsys, command)
    assert expected in err, err


def _cli_error(args, tmp_path, capsys, command) -> str:
    argv = ["train", "flow_grpo", *args[1:]] if command == "train" else ["sample", *args[1:]]
    code, err, out = run_cli(argv, tmp_path, capsys)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()
    return err


def test_errors_doc_lists_every_model_folder_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for case in MODEL_FOLDER_CASES:
        assert f"| {case} |" in doc, case


@pytest.mark.parametrize("model, config, expected", [
    ("wan22", {}, "holds a Wan 2.1 pipeline (neither boundary_ratio nor expand_timesteps); use model.name=wan"),
    ("wan", {"boundary_ratio": 0.875}, "holds a Wan 2.2 pipeline (boundary_ratio / expand_timesteps); use "
                                      "model.name=wan22"),
    ("wan22", {"class": "WanImageToVideoPipeline"}, "holds a Wan image-to-video pipeline with channel-concatenated "
                                                   "image latents"),
])
def test_wan_folders_of_the_other_version_are_told_apart_before_loading(model, config, expected, tmp_path, capsys,
                                                                        no_model_load):
    """Wan 2.1 and 2.2 share WanPipeline: the pipeline config in model_index.json tells them apart."""
    pipeline_class = config.pop("class", "WanPipeline")
    folder = model_folder(tmp_path, pipeline_class, config=config)
    assert expected in _cli_error(["train", f"model.name={model}", f"model.path={folder}"], tmp_path, capsys, "train")
