#!/usr/bin/env python3
"""Scales a generated benchmark CMS (bench/pages.py, SQLite) up for the memory run:
every section of /home/news/ (with its topics, articles and German translations) is
copied K-1 times beside itself at the database level, as `section-N-cK`. Generating
100,000 pages through Wagtail's API takes hours on the project's VMs; this takes a
minute and gives the mirror the same kind of rows (pages with their live revisions,
page-type rows, reference index entries) with new ids, tree paths, URL paths and
translation keys. Revision contents are copied unchanged (their ids inside point at
the originals); the reference index, which the mirror reads, points at the copies.

    python3 bench/scale_cms.py SRC.sqlite3 DST.sqlite3 --copies 10
"""
import argparse, hashlib, shutil, sqlite3, sys

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # treebeard's path steps


def step(n):
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = ALPHABET[r] + out
    return out.rjust(4, "0")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--copies", type=int, default=10)
    a = ap.parse_args()
    shutil.copyfile(a.src, a.dst)
    db = sqlite3.connect(a.dst)
    page_ct = db.execute("SELECT id FROM django_content_type WHERE app_label='wagtailcore' AND model='page'").fetchone()[0]
    news = db.execute("SELECT id, path FROM wagtailcore_page WHERE slug='news' AND depth=3").fetchall()
    cols = [r[1] for r in db.execute("PRAGMA table_info(wagtailcore_page)")]
    for news_id, news_path in news:
        sections = db.execute("SELECT path, slug FROM wagtailcore_page WHERE depth=4 AND path LIKE ? ORDER BY path",
                              (news_path + "%",)).fetchall()
        n = len(sections)
        for k in range(1, a.copies):
            off = k * 1_000_000  # above every id the generator made
            for i, (spath, sslug) in enumerate(sections):
                new_spath = news_path + step(k * n + i + 1)
                rows = db.execute(f"SELECT {', '.join(cols)} FROM wagtailcore_page WHERE path LIKE ?", (spath + "%",)).fetchall()
                ids = {r[cols.index("id")] for r in rows}
                copied = []
                for r in rows:
                    d = dict(zip(cols, r))
                    d["path"] = new_spath + d["path"][len(spath):]
                    d["url_path"] = d["url_path"].replace(f"/{sslug}/", f"/{sslug}-c{k}/", 1)
                    if d["depth"] == 4:
                        d["slug"] = f"{sslug}-c{k}"
                        d["title"] = f"{d['title']} (copy {k})"
                    d["translation_key"] = hashlib.md5(f"{d['translation_key']}/{k}".encode()).hexdigest()
                    for c in ("live_revision_id", "latest_revision_id"):
                        d[c] = d[c] + off if d[c] else None
                    d["id"] += off
                    copied.append(tuple(d[c] for c in cols))
                db.executemany(f"INSERT INTO wagtailcore_page ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", copied)
                idlist = ",".join(str(i) for i in ids)
                db.execute(f"INSERT INTO testsite_articlepage SELECT page_ptr_id + {off}, intro, body, attachment_id, hero_image_id, "
                           f"CASE WHEN related_page_id IN ({idlist}) THEN related_page_id + {off} ELSE related_page_id END "
                           f"FROM testsite_articlepage WHERE page_ptr_id IN ({idlist})")
                db.execute(f"INSERT INTO testsite_sectionpage SELECT page_ptr_id + {off}, body FROM testsite_sectionpage WHERE page_ptr_id IN ({idlist})")
                db.execute(f"INSERT INTO wagtailcore_revision (id, created_at, approved_go_live_at, user_id, content, object_id, content_type_id, base_content_type_id, object_str) "
                           f"SELECT id + {off}, created_at, approved_go_live_at, user_id, content, CAST(CAST(object_id AS INTEGER) + {off} AS TEXT), content_type_id, base_content_type_id, object_str "
                           f"FROM wagtailcore_revision WHERE base_content_type_id = {page_ct} AND CAST(object_id AS INTEGER) IN ({idlist})")
                db.execute(f"INSERT INTO wagtailcore_referenceindex (object_id, to_object_id, model_path, content_path, content_path_hash, base_content_type_id, content_type_id, to_content_type_id) "
                           f"SELECT CAST(CAST(object_id AS INTEGER) + {off} AS TEXT), "
                           f"CASE WHEN to_content_type_id = {page_ct} AND CAST(to_object_id AS INTEGER) IN ({idlist}) THEN CAST(CAST(to_object_id AS INTEGER) + {off} AS TEXT) ELSE to_object_id END, "
                           f"model_path, content_path, content_path_hash, base_content_type_id, content_type_id, to_content_type_id "
                           f"FROM wagtailcore_referenceindex WHERE base_content_type_id = {page_ct} AND CAST(object_id AS INTEGER) IN ({idlist})")
        db.execute("UPDATE wagtailcore_page SET numchild = ? WHERE id = ?", (n * a.copies, news_id))
    db.commit()
    live = db.execute("SELECT COUNT(*) FROM wagtailcore_page p JOIN wagtailcore_page r ON p.path LIKE r.path || '%' "
                      "WHERE r.slug = 'news' AND r.depth = 3 AND p.live").fetchone()[0]
    print(live)


if __name__ == "__main__":
    sys.exit(main())
