import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import caseops  # noqa: E402
import embedded_corpus  # noqa: E402
from shards import read_shard, split_documents, verify_sidecar  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def test_embedded_corpus_builds_a_real_text_dataset(tmp_path, capsys):
    embedded_corpus.main([str(tmp_path / "a")])
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    data, model = Path(printed["DATA_PATH"]), Path(printed["TOKENIZER_PATH"])
    assert printed["VOCAB_SIZE"] == "1024"
    sp = load_tokenizer(model)
    assert sp.get_piece_size() == 1024 and sp.piece_to_id("\u2581") != sp.unk_id()
    val = split_documents(read_shard(data / "fineweb_val_000000.bin"))
    train = split_documents(read_shard(data / "fineweb_train_000000.bin"))
    assert (len(val), len(train)) == (60, 1129)  # 1,189 KJV chapters, every 20th one is val
    assert sp.decode(val[0][1:].tolist()).startswith("In the beginning God created the heaven and the earth.")
    assert sum(map(len, train)) > 10**6

    embedded_corpus.main([str(tmp_path / "b")])  # deterministic
    for path in [model, *data.iterdir()]:
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_embedded_caseops_corpus_has_exact_sidecars(tmp_path):
    paths = embedded_corpus.build_embedded(tmp_path, use_caseops=True)
    data = paths["DATA_PATH"]
    verify_sidecar(data / "fineweb_val_000000.bin", data / "fineweb_val_bytes_000000.bin")
    tokens, counts = read_shard(data / "fineweb_val_000000.bin"), read_shard(data / "fineweb_val_bytes_000000.bin")
    starts = np.flatnonzero(tokens == 1)
    chapters = embedded_corpus.kjv_chapters()[:: embedded_corpus.VAL_EVERY]
    assert [int(c.sum()) for c in np.split(counts, starts[1:])] == [len(c.encode()) for c in chapters]
    sp = load_tokenizer(paths["TOKENIZER_PATH"])
    assert caseops.inverse(sp.decode(tokens[1:starts[1]].tolist())) == chapters[0]
