"""The stdlib language model: windows and continuations, the causal model, module scores against the
explicit damped-GGN influence, and the app's `experiment=stdlib_lm` end to end (tiny settings)."""

from __future__ import annotations

import csv
import json
import sys

import lightning as L
import pytest
import torch
from conftest import pearson
from torch.func import functional_call, jacrev
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import AttributionCallback, IndexedDataset, ResponseStore
from lightning_attr.functional import autodiff_kernels
from lightning_attr.data.stdlib_text import VOCAB_SIZE, decode, encode, load_stdlib_text
from lightning_attr.models import CausalLM
from lightning_attr.models.causal_lm import IGNORE_INDEX, token_losses


def _corpus(root, sizes: dict[str, int]) -> None:
    """Python-like files: numbered lines with module-specific names, each file about ``size`` bytes."""
    for name, size in sizes.items():
        lines, i = [], 0
        while sum(len(line) + 1 for line in lines) < size:
            if i % 5 == 4:
                lines.append(f"{name[:2]}{i}()")
            else:
                lines.append(f"    {name}_value_{i} = compute_{name}({i}, key='{name}{i % 7}')" if i % 3 else f"def {name}_{i}():")
            i += 1
        (root / f"{name}.py").write_text("\n".join(lines) + "\n")


def test_windows_and_held_out_continuations(tmp_path):
    _corpus(tmp_path, {"beta": 3000, "alpha": 3000, "gamma": 5000, "tiny": 500})
    text = load_stdlib_text(n_modules=3, windows_per_module=4, context=40, queries_per_module=2, min_bytes=1000,
                            stdlib_dir=tmp_path)
    assert text.modules == ["alpha", "beta", "gamma"]  # sorted; "tiny" is below min_bytes
    assert text.x_train.shape == (12, 40) and text.module_of_window.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(text.x_train[:, 1:], text.y_train[:, :-1])  # next-token targets
    assert len(text.x_query) == 6 and text.module_of_query.tolist() == [0, 0, 1, 1, 2, 2]
    for q in range(len(text.x_query)):
        module = text.modules[int(text.module_of_query[q])]
        source = (tmp_path / f"{module}.py").read_text()
        scored = text.y_query[q] != IGNORE_INDEX
        assert scored[-1] and not scored[0] and int(scored.float().argmax()) + int(scored.sum()) == 40  # one tail
        context, line = text.continuation(q)
        assert line.endswith("\n") and "\n" not in line[:-1] and len(line.strip()) >= 12
        # the line is a whole line of the module, and lies in the held-out part (after the training text)
        start = source.index("\n" + line) + 1
        assert start >= int(len(source) * 0.8) and context.endswith("\n") and (context + line) in source
        assert torch.equal(text.x_query[q, 1:][scored[:-1]], text.y_query[q, :-1][scored[:-1]])
    assert decode(encode(b"x = 1\n\tq")) == "x = 1\n?q"  # a tab is outside printable ASCII
    with pytest.raises(ValueError, match="lower n_modules or min_bytes"):
        load_stdlib_text(n_modules=5, min_bytes=1000, stdlib_dir=tmp_path)
    with pytest.raises(ValueError, match="raise min_bytes or lower context"):
        load_stdlib_text(n_modules=1, context=900, min_bytes=1000, stdlib_dir=tmp_path)


def test_causal_lm_is_causal_and_scores_only_the_continuation():
    torch.manual_seed(0)
    model = CausalLM(VOCAB_SIZE, context=12, dim=16, heads=2, depth=2, ff=32).eval()
    tokens = torch.randint(0, VOCAB_SIZE, (3, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB_SIZE
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # no position sees the future
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-4
    targets = torch.randint(0, VOCAB_SIZE, (3, 12))
    targets[:, :9] = IGNORE_INDEX
    expected = F.cross_entropy(a[:, 9:].reshape(-1, VOCAB_SIZE), targets[:, 9:].reshape(-1), reduction="none").view(3, 3).mean(1)
    torch.testing.assert_close(token_losses(a, targets), expected)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 13, dtype=torch.long))


def _explicit_module_influence(model, text, damping: float) -> torch.Tensor:
    """``Tensor[Q, M]`` = (1/n) grad f_q^T (G + damping I)^-1 sum_{i in module} grad l_i with the explicit GGN of the
    mean-over-positions cross-entropy (``H_i``: block diagonal over positions of ``(diag p - p p^T) / T``)."""
    model = model.eval().double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(vec):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vec[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def logits(vec, x):
        return functional_call(model, params(vec), (x,))

    n, t = text.x_train.shape
    ggn = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i in range(n):
        jac = jacrev(logits)(theta, text.x_train[i : i + 1])[0]  # [T, V, P]
        p = torch.softmax(logits(theta, text.x_train[i : i + 1])[0], dim=-1)  # [T, V]
        h = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / t
        ggn += torch.einsum("tvp,tvw,twq->pq", jac, h, jac)
    ggn /= n
    g_train = jacrev(lambda vec: token_losses(logits(vec, text.x_train), text.y_train))(theta)  # [n, P]
    g_query = jacrev(lambda vec: token_losses(logits(vec, text.x_query), text.y_query))(theta)  # [Q, P]
    per_module = torch.zeros(len(text.modules), len(theta), dtype=torch.float64).index_add_(0, text.module_of_window, g_train)
    solved = torch.linalg.solve(ggn + damping * torch.eye(len(theta), dtype=torch.float64), per_module.T)
    return (g_query @ solved / n).float()


def test_module_scores_match_the_explicit_damped_ggn(tmp_path):
    """End mode with exact curvature (curvature batch >= n): one response per module; its scores on held-out
    continuations against the explicit damped-GGN influence of the module (sum over its windows)."""
    _corpus(tmp_path, {name: 1500 for name in ("ant", "bee", "cow", "doe")})
    text = load_stdlib_text(n_modules=4, windows_per_module=3, context=16, queries_per_module=2, min_bytes=1000,
                            stdlib_dir=tmp_path)
    L.seed_everything(0, verbose=False)
    model = CausalLM(VOCAB_SIZE, context=16, dim=4, heads=2, depth=1, ff=8, lr=0.2)
    callback = AttributionCallback(tmp_path / "r", sources=[text.modules[m] for m in text.module_of_window.tolist()],
                                   mode="end", horizon=100, curvature_batch_size=64, checkpoint_epochs=None)
    trainer = L.Trainer(max_epochs=10, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)

    trainer.fit(model, DataLoader(IndexedDataset(TensorDataset(text.x_train, text.y_train)), batch_size=4, shuffle=True))

    store = ResponseStore.load(callback.dirpath)
    assert store.source_ids == text.modules
    scores = model.attribute((text.x_query, text.y_query), responses=callback.dirpath)  # [Q, 4]
    with autodiff_kernels(model):  # the math attention kernel: the flash kernel's backward has no batching rule
        exact = _explicit_module_influence(model, text, store.checkpoint_info("final")["step_rule"]["damping"])

    assert pearson(scores, exact) >= 0.99
    slope = float((scores * exact).sum() / (exact * exact).sum())
    assert 0.95 <= slope <= 1.05


def test_app_experiment_stdlib_lm_end_to_end(tmp_path):
    """`experiment=stdlib_lm` (tiny) trained and attributed through the apps' entry points (in process: the
    console scripts are the same functions behind Hydra): sources named by module, continuations reported as text."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_attr.app.attribute import attribute_run
    from lightning_attr.app.train import run_train

    tiny = ["experiment=stdlib_lm", "data.n_modules=6", "data.windows_per_module=4", "data.context=32",
            "model.dim=8", "model.heads=2", "model.depth=1", "model.ff=16", "trainer.max_epochs=1",
            "callbacks.attribution.horizon=4", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    run = tmp_path / "run"
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_attr.conf", version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=[*tiny, f"output_dir={run}"]))
        assert summary["n_sources"] == 6 and summary["n_train"] == 24
        modules = ResponseStore.load(run / "responses").source_ids
        assert all(isinstance(m, str) and not m.startswith("module=") for m in modules)  # bare module names
        report = attribute_run(compose(config_name="attribute", overrides=[f"run_dir={run}", "n_drawn=2", "top_k=3"]))
    GlobalHydra.instance().clear()
    assert (run / "figures" / "query_000.png").stat().st_size > 1000 and (run / "report.html").is_file()
    assert report["n_queries"] == len(json.loads((run / "attributions.json").read_text())["rows"]) // 6
    with open(run / "attributions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["source_id"] for r in rows} <= set(modules)
    assert all("» " in r["query_text"] and r["query_text"].endswith("\n") for r in rows)  # context » continuation
    assert 0.0 <= report["accuracy"] <= 1.0  # next-byte accuracy on the continuations' positions


def test_the_example_ranks_a_module_by_its_scores():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    from stdlib_lm import in_module_order, own_module_ranks

    scores = torch.tensor([[0.1, 0.5, float("nan")], [0.3, 0.2, 0.1]])  # store order: ids c, a, b
    ordered = in_module_order(scores, ["c", "a", "b"], ["a", "b", "c"])
    assert torch.equal(ordered[1], torch.tensor([0.2, 0.1, 0.3]))
    ranks = own_module_ranks(ordered, torch.tensor([1, 2]))  # query 0's own module "b" scored NaN: last
    assert ranks.tolist() == [3, 1]


