"""Anytime inference: early exit per input, cost per exit, the accuracy/cost curve, `anytime-fl predict`."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from adapters.anytime import anytime_report, early_exit, flops_per_exit
from adapters.backbone import load_backbone
from adapters.model import AnytimeViT
from adapters.state import get_state
from anytime_fl import predict
from server_app.results import save_weights

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AnytimeViT(load_backbone("vit_micro_patch7_28"), num_classes=NUM_CLASSES)
    # Spread the exits' confidences so that thresholds split a batch.
    with torch.no_grad():
        for head in m.heads:
            head.fc.weight.mul_(40.0)
    return m.eval()


@pytest.fixture(scope="module")
def flops(model):
    return flops_per_exit(model)


@pytest.fixture(scope="module")
def x():
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_threshold_zero_always_exits_at_exit_1(model, x):
    out = early_exit(model, x, threshold=0.0)
    assert out.exits.tolist() == [1] * len(x)
    torch.testing.assert_close(out.logits, model(x, depth=1)[0])


def test_threshold_above_one_always_runs_to_the_last_exit(model, x):
    out = early_exit(model, x, 1.0001)
    assert out.exits.tolist() == [model.num_blocks] * len(x)
    torch.testing.assert_close(out.logits, model(x)[-1], rtol=1e-4, atol=1e-5)
    capped = early_exit(model, x, 1.0001, max_depth=5)
    assert capped.exits.tolist() == [5] * len(x)
    torch.testing.assert_close(capped.logits, model(x, depth=5)[-1], rtol=1e-4, atol=1e-5)


def test_batched_early_exit_runs_deeper_blocks_only_for_inputs_still_running(model, x):
    conf1 = model(x, depth=1)[0].softmax(-1).amax(-1)
    threshold = float(conf1.median().detach())
    rows_per_block = []
    hooks = [b.register_forward_hook(lambda m, i, o: rows_per_block.append(o.shape[0])) for b in model.backbone.blocks]
    try:
        out = early_exit(model, x, threshold)
    finally:
        for h in hooks:
            h.remove()
    exits = out.exits
    assert 0 < int((exits == 1).sum()) < len(x), "the threshold should split the batch"
    # block b runs exactly for the inputs that leave at exit b or later
    expected = [int((exits >= b).sum()) for b in range(1, model.num_blocks + 1)]
    assert rows_per_block == [n for n in expected if n > 0]
    for j in range(len(x)):
        alone = model(x[j : j + 1], depth=int(exits[j]))
        torch.testing.assert_close(out.logits[j], alone[-1][0], rtol=1e-4, atol=1e-5)
        # it left at the first exit that was confident enough
        confs = [float(z.softmax(-1).max()) for z in alone]
        assert all(c < threshold for c in confs[:-1])
        assert int(exits[j]) == model.num_blocks or confs[-1] >= threshold


def test_cost_grows_with_the_exit(model, flops):
    assert len(flops) == model.num_blocks
    assert all(b > a > 0 for a, b in zip(flops, flops[1:]))
    # Each exit adds at least one backbone block's matmuls (qkv, proj, mlp,
    # q@k and attn@v over T tokens of width D): all must be counted.
    t, d, hidden = 17, 96, 384
    block = 2 * t * d * (3 * d + d + 2 * hidden) + 2 * 2 * t * t * d
    assert min(np.diff(flops)) >= block
    assert flops[-1] > model.num_blocks * block


def test_curve_matches_per_input_early_exit(model, x, flops):
    y = torch.randint(0, NUM_CLASSES, (len(x),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        thresholds = (0.0, 0.5, float(model(x, depth=1)[0].softmax(-1).amax(-1).median()), 1.5)
    report = anytime_report(model, DataLoader(TensorDataset(x, y), batch_size=5), thresholds)
    assert report["num-examples"] == len(x)
    assert [e["flops"] for e in report["exits"]] == flops
    full = model(x)
    for e, z in zip(report["exits"], full):
        assert e["accuracy"] == pytest.approx(float((z.argmax(-1) == y).float().mean()), abs=1e-4)
    for row in report["dynamic"]:
        out = early_exit(model, x, row["threshold"])
        assert row["accuracy"] == pytest.approx(float((out.logits.argmax(-1) == y).float().mean()), abs=1e-4)
        assert row["mean-blocks"] == pytest.approx(float(out.exits.float().mean()), abs=1e-4)
        assert row["mean-flops"] == pytest.approx(float(np.mean([flops[e - 1] for e in out.exits.tolist()])))
        assert sum(row["exit-counts"]) == len(x)
    assert report["dynamic"][0]["mean-blocks"] == 1.0
    assert report["dynamic"][-1]["mean-blocks"] == model.num_blocks


def test_ensemble_exit_is_the_mean_of_the_heads_so_far_and_early_exit_agrees(model, x):
    ens = copy.deepcopy(model)
    ens.ensemble = True
    with torch.no_grad():
        own, mixed = model(x), ens(x)
    for k in range(model.num_blocks):
        torch.testing.assert_close(mixed[k], torch.stack(own[: k + 1]).mean(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[-1], own[-1])
    confs = torch.stack([z.softmax(-1).amax(-1) for z in mixed])  # (L, B)
    threshold = float(confs[1].median())
    out = early_exit(ens, x, threshold)
    assert len(set(out.exits.tolist())) > 1, "the threshold should split the batch"
    for j, e in enumerate(out.exits.tolist()):
        torch.testing.assert_close(out.logits[j], mixed[e - 1][j], rtol=1e-4, atol=1e-5)
        assert e == model.num_blocks or confs[e - 1, j] >= threshold
        assert all(confs[: e - 1, j] < threshold)


def test_patch_mean_exit_reads_its_blocks_patch_tokens_and_early_exit_agrees(x):
    torch.manual_seed(0)
    m = AnytimeViT(load_backbone("vit_micro_patch7_28"), NUM_CLASSES, ensemble=True, patch_mean=True).eval()
    assert m.heads[0].fc.in_features == 2 * m.backbone.embed_dim
    with torch.no_grad():
        for head in m.heads:
            head.fc.weight.mul_(40.0)
        tokens = m.backbone.blocks[0](m.embed(x))
        summary, _ = m.adapters[0](tokens[:, :1])
        h = m.heads[0]
        want = h.fc(torch.cat([h.norm(summary + tokens[:, 0]), h.patch_norm(tokens[:, 1:].mean(1))], -1))
        full = m(x)
    torch.testing.assert_close(full[0], want, rtol=1e-4, atol=1e-5)
    threshold = float(torch.stack([z.softmax(-1).amax(-1) for z in full])[2].median())
    out = early_exit(m, x, threshold)
    assert len(set(out.exits.tolist())) > 1, "the threshold should split the batch"
    for j, e in enumerate(out.exits.tolist()):
        torch.testing.assert_close(out.logits[j], full[e - 1][j], rtol=1e-4, atol=1e-5)


# -- anytime-fl predict ----------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
    """A run directory as the server leaves it, with a backbone file so predict rebuilds the same model."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("run")
    backbone = folder / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(backbone))
    cfg = {"backbone-weights": str(backbone), "task": "digits"}
    save_weights(folder, get_state(model), {"config": cfg, "num-blocks": model.num_blocks})
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def _predict_json(capsys, *argv):
    assert predict.main([*map(str, argv), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_reports_exit_and_cost(run_dir, model, flops, capsys):
    files = [run_dir / f"img{i}.png" for i in range(3)]
    rows = _predict_json(capsys, run_dir, *files, "--exit", 4)
    assert [(r["exit"], r["blocks"], r["flops"]) for r in rows] == [(4, 4, flops[3])] * 3
    assert [r["exit"] for r in _predict_json(capsys, run_dir, *files, "--threshold", 0)] == [1, 1, 1]
    deepest = _predict_json(capsys, run_dir / "adapters.safetensors", *files)
    assert [(r["exit"], r["flops"]) for r in deepest] == [(12, flops[-1])] * 3
    # the prediction is the trained model's: same pixels through the model directly
    pixels = np.asarray(Image.open(files[0]), dtype=np.float32) / 255.0
    x = (torch.from_numpy(pixels)[None, None] - 0.5) / 0.5
    assert deepest[0]["class"] == int(model(x)[-1].argmax())


def test_predict_builds_the_exits_the_weights_were_saved_with(run_dir, model, tmp_path):
    old = predict.load_run(str(run_dir))[0]  # saved before the keys existed
    assert (old.ensemble, old.patch_mean) == (False, False)
    cfg = {"backbone-weights": str(run_dir / "backbone.safetensors"), "task": "digits"}
    cfg |= {"exit-ensemble": True, "exit-patch-mean": True}
    torch.manual_seed(0)
    saved = AnytimeViT(model.backbone, NUM_CLASSES, ensemble=True, patch_mean=True)
    save_weights(tmp_path, get_state(saved), {"config": cfg, "num-blocks": model.num_blocks})
    new = predict.load_run(str(tmp_path))[0]
    assert (new.ensemble, new.patch_mean) == (True, True)
    torch.testing.assert_close(new.heads[3].fc.weight, saved.heads[3].fc.weight)


def test_predict_names_bad_inputs(run_dir, tmp_path, capsys):
    assert predict.main([str(tmp_path), str(run_dir / "img0.png")]) == 2
    assert "adapters.safetensors" in capsys.readouterr().err
    assert predict.main([str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    assert predict.main([str(run_dir), str(tmp_path / "notes.png")]) == 2
    assert "notes.png: not an image" in capsys.readouterr().err
    assert predict.main([str(run_dir), str(run_dir / "img0.png"), "--exit", "13"]) == 2
    assert "--exit must be in 1..12" in capsys.readouterr().err


def test_predict_audio_without_the_speech_task_says_so(run_dir, tmp_path, capsys, monkeypatch):
    import sys

    wav = tmp_path / "clip.wav"
    wav.write_bytes(b"RIFF")
    monkeypatch.setitem(sys.modules, "fedtasks.audio", None)  # as if fedtasks/audio.py were absent
    assert predict.main([str(run_dir), str(wav)]) == 2
    assert "clip.wav: audio input needs the speech task" in capsys.readouterr().err


def test_predict_reads_wav_through_the_speech_features(run_dir, tmp_path, flops, capsys):
    import soundfile as sf

    t = np.arange(16_000) / 16_000
    sf.write(tmp_path / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16_000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt ")
    rows = _predict_json(capsys, run_dir, tmp_path / "tone.wav", run_dir / "img0.png", "--max-depth", 6)
    assert [(r["exit"], r["flops"]) for r in rows] == [(6, flops[5])] * 2
    assert predict.main([str(run_dir), str(tmp_path / "broken.wav")]) == 2
    assert "broken.wav" in capsys.readouterr().err


def test_the_summary_picks_the_cheapest_threshold_near_the_best_exit():
    from server_app.finish import early_exit_pick

    exits = [{"accuracy": a} for a in (0.70, 0.90, 0.95)]
    dynamic = [
        {"threshold": t, "accuracy": a, "mean-flops": f}
        for t, a, f in ((0.0, 0.70, 1), (0.8, 0.93, 2), (0.9, 0.945, 3), (1.0, 0.95, 4))
    ]
    assert early_exit_pick({"exits": exits, "dynamic": dynamic})["threshold"] == 0.9
    # no threshold within a point of the best exit: the most accurate one, not the cheapest of all
    exits[-1]["accuracy"] = 0.99
    assert early_exit_pick({"exits": exits, "dynamic": dynamic})["threshold"] == 1.0
