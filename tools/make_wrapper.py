"""Write the self-extracting code wrapper of a script (train_gpt.build_code_wrapper: LZMA + base85
in a short stub), the form whose size a submission counts as its code bytes.
    python3 tools/make_wrapper.py SRC OUT [--minify]

--minify first runs the source through python-minifier, like
`pyminify --no-rename-locals --no-hoist-literals --remove-literal-statements`, except that function
argument and return annotations are kept: torch.library.custom_op builds its schema from them and
Triton reads tl.constexpr from them, so stripping them (pyminify's default) breaks train_gpt.py at
import. Variable annotations are still removed; class attribute annotations (the dataclass fields)
are kept, as pyminify does by default."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

# pyminify --no-rename-locals --no-hoist-literals --remove-literal-statements
MINIFY_OPTIONS = dict(rename_locals=False, hoist_literals=False, remove_literal_statements=True)


def minify(source: bytes) -> bytes:
    try:
        import python_minifier
    except ImportError:
        raise SystemExit("error: --minify needs the python-minifier package, which is not installed "
                         "(pip install python-minifier)") from None
    annotations = python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=False,
        remove_argument_annotations=False, remove_class_attribute_annotations=False)
    return python_minifier.minify(source.decode("utf-8"), remove_annotations=annotations,
                                  **MINIFY_OPTIONS).encode("utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the self-extracting code wrapper of a script.")
    parser.add_argument("src", help="the script to wrap (e.g. train_gpt.py)")
    parser.add_argument("out", help="where to write the wrapper")
    parser.add_argument("--minify", action="store_true", help="minify the source first (python-minifier)")
    args = parser.parse_args(argv)
    with open(args.src, "rb") as f:
        source = f.read()
    raw = len(source)
    if args.minify:
        source = minify(source)
    wrapper = tg.build_code_wrapper(source)
    with open(args.out, "wb") as f:
        f.write(wrapper)
    if args.minify:
        print(f"raw: {raw} bytes, minified: {len(source)} bytes, wrapper: {len(wrapper)} bytes")
    else:
        print(f"raw: {raw} bytes, wrapper: {len(wrapper)} bytes")


if __name__ == "__main__":
    main()
