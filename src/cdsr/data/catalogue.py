"""The catalogue of the official Amazon review releases that `cdsr data fetch` downloads.

One owner: this module. Each release lists its download roots in the order they are tried
(mirrors), the file kinds it publishes (a kind is one or more paths relative to a root, with
``{category}`` in them) and its categories as the release spells them. A file is addressed by
``<release>/<path>`` (e.g. ``2023/raw/review_categories/Books.jsonl.gz``): that key names it in
the lock file (``fetch.lock.json``) and under a private mirror (``<base_url>/<release>/<path>``).

Where the locations come from (as public pages and scripts give them, read through a search
index in December 2026; these machines cannot reach the hosts, so no URL was requested here):

- 2014 ("Image-based recommendations on styles and substitutes", McAuley et al.): first served
  from jmcauley.ucsd.edu/data/amazon/ (retired); the same ``categoryFiles/`` tree is served by
  the lab's new host under ``public_datasets/data/amazon/`` and by SNAP under
  ``data/amazon/productGraph/`` (``ratings_<Cat>.csv``, ``reviews_<Cat>_5.json.gz``,
  ``meta_<Cat>.json.gz``). SNAP over https has been seen to reset TLS connections, so it is
  listed over http; the checksums pinned in the lock file are what makes that safe.
- 2018 (Ni, Li, McAuley, EMNLP 2019; nijianmo.github.io/amazon): first served from
  deepyeti.ucsd.edu/jianmo/amazon/ and jmcauley.ucsd.edu/data/amazon_v2/ (both retired); now
  ``public_datasets/data/amazon_v2/`` on mcauleylab.ucsd.edu, also seen under
  datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/ (``categoryFilesSmall/<Cat>.csv`` ratings,
  ``categoryFilesSmall/<Cat>_5.json.gz`` 5-core reviews, ``metaFiles2/meta_<Cat>.json.gz``).
- 2023 (Hou et al., "Bridging Language and Items for Retrieval and Recommendation";
  amazon-reviews-2023.github.io): ``public_datasets/data/amazon_2023/`` on mcauleylab.ucsd.edu
  (``raw/review_categories/<Cat>.jsonl.gz``, ``raw/meta_categories/meta_<Cat>.jsonl.gz``,
  ``benchmark/5core/{last_out,last_out_w_his,timestamp,timestamp_w_his}/<Cat>.{train,valid,test}.csv.gz``).
  The Hugging Face dataset McAuley-Lab/Amazon-Reviews-2023 holds the same tables *uncompressed*
  (``.jsonl`` / ``.csv``): different bytes, so it is not listed as a mirror of these files.

No size or checksum is published for these files, so none is pinned here: the first download
records size and sha256 in the lock file, and every later download (from any mirror) must
match it. ``KNOWN`` takes a published pin (sha256 or md5) when one appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pin:
    """What a file must be: size in bytes and a digest (sha256 preferred; md5 where only that is
    published). Any of them may be unknown (None)."""

    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Release:
    name: str
    homepage: str
    # download roots, tried in this order; a path of `kinds` is appended to each
    mirrors: tuple[str, ...]
    # kind -> paths relative to a root ({category} is substituted)
    kinds: dict[str, tuple[str, ...]]
    categories: tuple[str, ...]
    # hosts that served the release once and no longer do (documentation; never tried)
    retired: tuple[str, ...] = ()
    # published pins, by path relative to a root
    known: dict[str, Pin] = field(default_factory=dict)


_CATEGORIES_2014 = (
    "Amazon_Instant_Video", "Apps_for_Android", "Automotive", "Baby", "Beauty", "Books", "CDs_and_Vinyl",
    "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Digital_Music", "Electronics",
    "Grocery_and_Gourmet_Food", "Health_and_Personal_Care", "Home_and_Kitchen", "Kindle_Store",
    "Movies_and_TV", "Musical_Instruments", "Office_Products", "Patio_Lawn_and_Garden", "Pet_Supplies",
    "Sports_and_Outdoors", "Tools_and_Home_Improvement", "Toys_and_Games", "Video_Games",
)

_CATEGORIES_2018 = (
    "AMAZON_FASHION", "All_Beauty", "Appliances", "Arts_Crafts_and_Sewing", "Automotive", "Books",
    "CDs_and_Vinyl", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Digital_Music",
    "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food", "Home_and_Kitchen", "Industrial_and_Scientific",
    "Kindle_Store", "Luxury_Beauty", "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments",
    "Office_Products", "Patio_Lawn_and_Garden", "Pet_Supplies", "Prime_Pantry", "Software",
    "Sports_and_Outdoors", "Tools_and_Home_Improvement", "Toys_and_Games", "Video_Games",
)

_CATEGORIES_2023 = (
    "All_Beauty", "Amazon_Fashion", "Appliances", "Arts_Crafts_and_Sewing", "Automotive", "Baby_Products",
    "Beauty_and_Personal_Care", "Books", "CDs_and_Vinyl", "Cell_Phones_and_Accessories",
    "Clothing_Shoes_and_Jewelry", "Digital_Music", "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food",
    "Handmade_Products", "Health_and_Household", "Health_and_Personal_Care", "Home_and_Kitchen",
    "Industrial_and_Scientific", "Kindle_Store", "Magazine_Subscriptions", "Movies_and_TV",
    "Musical_Instruments", "Office_Products", "Patio_Lawn_and_Garden", "Pet_Supplies", "Software",
    "Sports_and_Outdoors", "Subscription_Boxes", "Tools_and_Home_Improvement", "Toys_and_Games",
    "Video_Games", "Unknown",
)

_SPLITS = ("train", "valid", "test")


def _benchmark(variant: str) -> tuple[str, ...]:
    return tuple(f"benchmark/5core/{variant}/{{category}}.{s}.csv.gz" for s in _SPLITS)


RELEASES: dict[str, Release] = {
    "2014": Release(
        name="2014",
        homepage="https://mcauleylab.ucsd.edu/public_datasets/data/amazon/index_2014.html",
        mirrors=("https://mcauleylab.ucsd.edu/public_datasets/data/amazon/",
                 "http://snap.stanford.edu/data/amazon/productGraph/"),
        kinds={
            "ratings": ("categoryFiles/ratings_{category}.csv",),          # user,item,rating,ts (ratings-csv-2014)
            "reviews-5core": ("categoryFiles/reviews_{category}_5.json.gz",),  # amazon-review-json
            "meta": ("categoryFiles/meta_{category}.json.gz",),
        },
        categories=_CATEGORIES_2014,
        retired=("http://jmcauley.ucsd.edu/data/amazon/",),
    ),
    "2018": Release(
        name="2018",
        homepage="https://nijianmo.github.io/amazon/",
        mirrors=("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/",
                 "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"),
        kinds={
            "ratings": ("categoryFilesSmall/{category}.csv",),             # item,user,rating,ts (ratings-csv-2018)
            "reviews-5core": ("categoryFilesSmall/{category}_5.json.gz",),  # amazon-review-json
            "meta": ("metaFiles2/meta_{category}.json.gz",),
        },
        categories=_CATEGORIES_2018,
        retired=("http://deepyeti.ucsd.edu/jianmo/amazon/", "https://jmcauley.ucsd.edu/data/amazon_v2/"),
    ),
    "2023": Release(
        name="2023",
        homepage="https://amazon-reviews-2023.github.io/",
        mirrors=("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/",),
        kinds={
            "reviews": ("raw/review_categories/{category}.jsonl.gz",),      # amazon-2023-jsonl
            "meta": ("raw/meta_categories/meta_{category}.jsonl.gz",),
            "benchmark-5core-last-out": _benchmark("last_out"),
            "benchmark-5core-last-out-w-his": _benchmark("last_out_w_his"),
            "benchmark-5core-timestamp": _benchmark("timestamp"),          # amazon-2023-benchmark-csv
            "benchmark-5core-timestamp-w-his": _benchmark("timestamp_w_his"),
        },
        categories=_CATEGORIES_2023,
    ),
}


class CatalogueError(ValueError):
    """A release, kind or category the catalogue does not have."""


def release(name: str) -> Release:
    if name not in RELEASES:
        raise CatalogueError(f"unknown release {name!r}; known: {sorted(RELEASES)}")
    return RELEASES[name]


def paths(release_name: str, categories: list[str], kinds: list[str]) -> list[str]:
    """The paths (relative to a root) of ``kinds`` for ``categories``, in category then kind
    order; an unknown release, kind or category is a CatalogueError naming it."""
    rel = release(release_name)
    bad_kinds = [k for k in kinds if k not in rel.kinds]
    if bad_kinds:
        raise CatalogueError(f"release {release_name}: unknown file kind(s) {bad_kinds}; known: {list(rel.kinds)}")
    bad_cats = [c for c in categories if c not in rel.categories]
    if bad_cats:
        raise CatalogueError(f"release {release_name}: unknown categor(y/ies) {bad_cats} "
                             f"(names as the release spells them; see `cdsr data fetch --list`)")
    if not categories or not kinds:
        raise CatalogueError(f"release {release_name}: give at least one category and one file kind")
    return [p.format(category=c) for c in categories for k in kinds for p in rel.kinds[k]]
