"""bench.families end to end on tiny shapes of its families (a smoke run: it runs, renders and
its lean rows carry the ratios against both peers)."""

import json

import bench.families as families
from bench import common


def test_the_families_benchmark_runs_and_writes_its_rows(monkeypatch, tmp_path):
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    monkeypatch.setattr(families, "FAMILIES", {
        "llama": dict(model_type="llama", **tiny),
        "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"], **tiny),
        "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    })
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert families.main(["--repeats", "2", "--new-tokens", "8", "--prompt-tokens", "12", "--dtype", "float32"]) == 0
    payload = json.loads((tmp_path / "families.json").read_text())
    rows = payload["rows"]
    assert {(r["family"], r["vs"]) for r in rows} == {(f, vs) for f in ("llama", "gemma3")
                                                     for vs in ("transformers_forward", "hf_generate")}
    assert all(r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["same"] == "2/2" for r in rows)          # float32 random models: no near-ties to flip
    md = (tmp_path / "families.md").read_text()
    assert "| gemma3 | on |" in md and "gpt2" not in md     # a family off the lean forward has no row
