"""Convert LLaVA-style conversation data to megasae's chat Parquet schema.

    python launch/prepare_llava.py llava_instruct.json data/llava.parquet --image-dir coco/
    python launch/prepare_llava.py llava.parquet data/llava-chat.parquet --image-column image

Then train on it: `megasae train --data data/llava.parquet ...` with an image-text host model.
"""

import argparse

from megasae.data import prepare_llava


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "src", help="a LLaVA JSON file (images beside it or under --image-dir) or a Parquet file"
    )
    parser.add_argument("dst", help="the Parquet file to write")
    parser.add_argument(
        "--image-dir", help="where the JSON's relative image paths start (default: the JSON's folder)"
    )
    parser.add_argument(
        "--image-column", default="image", help="a Parquet source's image column (default: %(default)s)"
    )
    parser.add_argument(
        "--rows-per-group", type=int, default=256, help="rows per row group (default: %(default)s)"
    )
    args = parser.parse_args()
    rows = prepare_llava(
        args.src,
        args.dst,
        image_dir=args.image_dir,
        image_column=args.image_column,
        rows_per_group=args.rows_per_group,
    )
    print(f"wrote {rows} rows to {args.dst}")


if __name__ == "__main__":
    main()
