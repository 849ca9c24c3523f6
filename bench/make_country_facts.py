"""Writes bench/data/country_facts.jsonl: a first-token fact benchmark for machines without the BigBench
archive (bigbench==1.0.0 left PyPI). Facts from the ``countryinfo`` package (``pip install countryinfo``):
per country its capital, its region and its main language, as JSONL records the ``jsonl`` benchmark reads
({"prompt", "answer", "group"}; the three facts of a country share a group, so a split keeps them together).

Run once: ``python bench/make_country_facts.py``; the output is committed, so the bench needs no package.
"""

from __future__ import annotations

import json
from pathlib import Path


def main() -> None:
    import countryinfo

    out = []
    for c in countryinfo.all_countries():
        try:
            name, capital, region, langs = c.name(), c.capital(), c.region(), c.languages()
        except Exception:  # noqa: BLE001 - an incomplete record
            continue
        if not name or not isinstance(capital, str) or not capital.strip():
            continue
        name = name.title() if name.islower() else name
        out.append({"id": f"{name}-capital", "group": name, "prompt": f"The capital city of {name} is",
                    "answer": capital})
        if isinstance(region, str) and region.strip():
            out.append({"id": f"{name}-region", "group": name, "prompt": f"{name} is a country in",
                        "answer": region})
    path = Path(__file__).with_name("data") / "country_facts.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {path} ({len(out)} examples)")


if __name__ == "__main__":
    main()
