"""`megasae bench interop` without the peers installed: it exports (a TopK SAE, a transcoder, a BatchTopK
SAE), refuses what a format cannot express and says which peers it could not run."""

from megasae.bench.interop import format_table, parse_args, run


def test_interop_without_the_peers(tmp_path):
    missing = str(tmp_path / "none")
    args = parse_args(["--saelens-python", missing, "--sparsify-python", missing, "--tokens", "8"])
    result = run(args)
    notes = {(row["peer"], row["sae"]): row["note"] for row in result["rows"]}
    assert notes == {
        ("saelens", "adapter-transcoder"): "refused: The SAE on 'model.layers.15.mlp' is a transcoder and "
                                           "SAELens has no TopK transcoder; export it to sparsify instead.",
        ("saelens", "adapter-sae:model.layers.15, adapter-batchtopk:model.layers.15"):
            "not run: no Python with saelens (--saelens-python)",
        ("sparsify", "adapter-batchtopk"): "refused: The SAE on 'model.layers.15' is a BatchTopK SAE, whose "
                                           "inference threshold sparsify's TopK SparseCoder cannot express; "
                                           "export it to SAELens (a JumpReLU SAE) instead.",
        ("sparsify", "adapter-sae:model.layers.15, adapter-transcoder:model.layers.15.mlp"):
            "not run: no Python with sparsify (--sparsify-python)",
    }
    assert "| saelens | adapter-transcoder | refused:" in format_table(result)
