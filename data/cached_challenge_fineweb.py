"""Download the published pre-tokenized FineWeb shards and their tokenizer.

    python3 data/cached_challenge_fineweb.py --variant sp1024|sp4096|sp8192|sp8192_caseops [--train-shards 80]

Fills data/datasets/<dataset dir>/ and data/tokenizers/ from the Hugging Face dataset
repo MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf), laid out as
  <root>/manifest.json
  <root>/datasets/<dataset dir>/fineweb_{train,val}_NNNNNN.bin  (+ fineweb_val_bytes_* for CaseOps)
  <root>/tokenizers/<tokenizer>.model (.vocab)
with <root> = MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets"). Every val shard
is fetched, and the first N train shards. Re-running is cheap: complete files are
skipped and partial ones fetched again (resumed, from a mirror). Every file is checked
against the size the repo lists (shards also against their header) before it takes its
final name.
--mirror DIR (or MATCHED_FINEWEB_MIRROR) reads the same layout from a local directory.
"""
import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from shards import DataError, verify_shard, verify_sidecar

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Variant:
    dataset_dir: str
    tokenizer: str  # file stem under tokenizers/
    has_sidecars: bool = False


VARIANTS = {
    "sp1024": Variant("fineweb10B_sp1024", "fineweb_1024_bpe"),
    "sp4096": Variant("fineweb10B_sp4096", "fineweb_4096_bpe"),
    "sp8192": Variant("fineweb10B_sp8192", "fineweb_8192_bpe"),
    "sp8192_caseops": Variant(
        "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
        "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved",
        has_sidecars=True,
    ),
}


class HubSource:
    """Files of a Hugging Face dataset repo, downloaded through staging_dir (on the same
    volume as the data, so that the finished file is moved, not copied)."""

    def __init__(self, repo_id: str, staging_dir: Path):
        from huggingface_hub import HfApi

        self.repo_id, self.staging_dir, self.api = repo_id, staging_dir, HfApi()

    def __str__(self) -> str:
        return f"hf://datasets/{self.repo_id}"

    def list_dir(self, remote_dir: str) -> dict[str, int]:
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = list(self.api.list_repo_tree(self.repo_id, remote_dir or None, repo_type="dataset"))
        except EntryNotFoundError:
            return {}
        return {Path(e.path).name: e.size for e in entries if isinstance(e, RepoFile)}

    def fetch(self, remote_path: str, partial: Path) -> int:
        """Download remote_path to partial; returns the bytes reused from an earlier attempt (none)."""
        from huggingface_hub import hf_hub_download

        staged = hf_hub_download(self.repo_id, remote_path, repo_type="dataset", local_dir=self.staging_dir)
        os.replace(staged, partial)
        return 0


class MirrorSource:
    """A local directory laid out like the hub repo (tests, air-gapped machines)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def list_dir(self, remote_dir: str) -> dict[str, int]:
        folder = self.root / remote_dir
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}

    def fetch(self, remote_path: str, partial: Path) -> int:
        """Copy into partial after the bytes it already holds; returns how many those were."""
        with (self.root / remote_path).open("rb") as src, partial.open("ab") as dst:
            reused = dst.tell()
            src.seek(reused)
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
        return reused


def is_complete(path: Path, size: int) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    if path.suffix == ".bin":
        try:
            verify_shard(path)
        except DataError:
            return False
    return True


def download(source, remote_path: str, dest: Path, size: int) -> str:
    """Make dest a complete copy of remote_path; returns what was done."""
    if is_complete(dest, size):
        return "complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)  # a wrong-size file under the final name is redone, not trusted
    partial = dest.with_name(dest.name + ".part")
    if partial.exists() and partial.stat().st_size > size:
        partial.unlink()
    reused = source.fetch(remote_path, partial)
    try:
        if partial.stat().st_size != size:
            raise DataError(f"{partial}: got {partial.stat().st_size} bytes, the source lists {size}")
        if dest.suffix == ".bin":
            verify_shard(partial)
    except DataError as e:
        partial.unlink()  # a bad copy must not be resumed
        raise DataError(f"bad download of {remote_path} from {source}: {e}") from None
    os.replace(partial, dest)
    return f"resumed after {reused:,} bytes" if reused else "downloaded"


def numbered(names: dict[str, int], prefix: str) -> list[str]:
    pattern = re.compile(rf"{prefix}_\d{{6}}\.bin")
    return sorted(n for n in names if pattern.fullmatch(n))


def fetch_variant(source, variant: Variant, train_shards: int, remote_root: str, data_dir: Path) -> list[Path]:
    """Download a variant into data_dir/datasets and data_dir/tokenizers; returns the local paths."""
    prefix = f"{remote_root.strip('/')}/" if remote_root.strip("/") else ""
    remote_dataset = f"{prefix}datasets/{variant.dataset_dir}"
    listing = source.list_dir(remote_dataset)
    if not listing:
        raise DataError(f"{source}: no files under {remote_dataset}")
    val, train = numbered(listing, "fineweb_val"), numbered(listing, "fineweb_train")
    sidecars = numbered(listing, "fineweb_val_bytes") if variant.has_sidecars else []
    if not val:
        raise DataError(f"{source}: no val shards under {remote_dataset}")
    if train_shards > len(train):
        raise DataError(f"{source}: {remote_dataset} has {len(train)} train shards, {train_shards} requested")
    if variant.has_sidecars and len(sidecars) != len(val):
        raise DataError(f"{source}: {remote_dataset} has {len(val)} val shards but {len(sidecars)} byte sidecars")

    local_dataset = data_dir / "datasets" / variant.dataset_dir
    wanted = [(f"{remote_dataset}/{n}", local_dataset / n, listing[n]) for n in val + sidecars + train[:train_shards]]
    tokenizers = source.list_dir(f"{prefix}tokenizers")
    model = f"{variant.tokenizer}.model"
    if model not in tokenizers:
        raise DataError(f"{source}: tokenizer {prefix}tokenizers/{model} not found")
    for name in (model, f"{variant.tokenizer}.vocab"):
        if name in tokenizers:
            wanted.append((f"{prefix}tokenizers/{name}", data_dir / "tokenizers" / name, tokenizers[name]))
    root_files = source.list_dir(remote_root.strip("/"))
    if "manifest.json" in root_files:
        wanted.append((f"{prefix}manifest.json", data_dir / "manifest.json", root_files["manifest.json"]))

    for i, (remote_path, dest, size) in enumerate(wanted, 1):
        print(f"[{i}/{len(wanted)}] {dest.name}: {download(source, remote_path, dest, size)}", flush=True)
    for n in sidecars:
        verify_sidecar(local_dataset / n.replace("_val_bytes_", "_val_"), local_dataset / n)
    return [dest for _, dest, _ in wanted]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    parser.add_argument("--train-shards", type=int, default=80, help="first N train shards (default 80)")
    parser.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID))
    parser.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets"))
    parser.add_argument("--mirror", type=Path, default=os.environ.get("MATCHED_FINEWEB_MIRROR"),
                        help="read from this local copy of the repo instead of the hub")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where datasets/ and tokenizers/ go (default: this script's folder)")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    try:
        source = MirrorSource(args.mirror) if args.mirror else HubSource(args.repo_id, args.data_dir / ".hf_staging")
        fetch_variant(source, VARIANTS[args.variant], args.train_shards, args.remote_root, args.data_dir)
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
