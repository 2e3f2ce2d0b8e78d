"""The test CMS's tools, all through Wagtail's own Python API (as an editor's actions
would be): build a site, change it, and dump Wagtail's API v2 for a subtree.

    python cms.py generate [--sections 3 --topics 2 --articles 3 --images 4 --docs 2]
    python cms.py bulk [--sections 10 --topics 10 --articles 66]   # the benchmark's site
    python cms.py mutate
    python cms.py edit --percent 1
    python cms.py api-dump --root /home/news/
    python cms.py retitle --id 12 --title "New title"
    python cms.py reslug --id 6 --slug new-slug
    CMS_TRANSFER_SOURCE=http://HOST:PORT python cms.py transfer-import --pages 4:en,6:de

The database and media directory come from CMS_DB and CMS_MEDIA_ROOT (see
cmsite/settings.py). `generate` migrates first and prints a JSON summary of what it
made (ids, url paths, what is live), which the tests compare with what they read.

The site: home (en, de) with `about` (outside the mirrored subtree) and `news` (the
subtree: sections > topics > articles, four levels). Articles link forward and backward
in tree order in rich text and to `about`; they use images and documents in foreign keys
and in rich text; sections use every kind of StreamField reference. German translations
exist for every section and every other topic and article. One article has a draft
change, one is unpublished, one was never published.
"""
import argparse
import io
import json
import os
import sys
import zlib
import struct

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cmsite.settings")

import django  # noqa: E402

django.setup()

from django.core.files.base import ContentFile  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from wagtail.documents.models import Document  # noqa: E402
from wagtail.images.models import Image  # noqa: E402
from wagtail.models import Locale, Page, Site  # noqa: E402

from testsite.models import ArticlePage, SectionPage  # noqa: E402


def png(seed, size=8):
    """A small valid PNG whose pixels depend on `seed`."""
    raw = b"".join(
        b"\x00" + bytes(((seed * 31 + x * 7 + y * 13) % 256) for x in range(size * 3))
        for y in range(size)
    )

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def publish(page):
    page.save_revision().publish()
    return page


def add(parent, page):
    parent.add_child(instance=page)
    return publish(page)


def page_link(page, text):
    return f'<a linktype="page" id="{page.id}">{text}</a>'


def article_body(prev, nxt, doc, img, outside):
    parts = ["<p>An article."]
    if prev is not None:
        parts.append(f" Back to {page_link(prev, 'the one before')}.")
    if nxt is not None:
        parts.append(f" On to {page_link(nxt, 'the next one')}.")
    if outside is not None:
        parts.append(f" About us: {page_link(outside, 'about')}.")
    parts.append(f' Read <a linktype="document" id="{doc.id}">the document</a>.</p>')
    parts.append(f'<embed embedtype="image" id="{img.id}" format="left" alt="picture {img.id}"/>')
    return "".join(parts)


def section_body(first, doc, img, title):
    return [
        ("heading", title),
        ("paragraph", f"<p>Start with {page_link(first, 'this article')}.</p>"),
        ("image", img),
        ("document", doc),
        ("page", first),
        ("card", {"title": "Featured", "link": first, "image": img}),
    ]


def make_media(n_images, n_docs):
    images = [
        Image.objects.create(title=f"picture {i}", file=ContentFile(png(i), name=f"picture-{i}.png"))
        for i in range(n_images)
    ]
    docs = [
        Document.objects.create(
            title=f"document {i}", file=ContentFile(f"document {i}\n".encode() * (100 + i), name=f"doc-{i}.txt")
        )
        for i in range(n_docs)
    ]
    return images, docs


def translate(page, locale, **fields):
    """A published German copy of `page` (its parent translated before)."""
    t = page.copy_for_translation(locale).specific
    for k, v in fields.items():
        setattr(t, k, v)
    t.save()
    return publish(t)


def generate(a):
    call_command("migrate", verbosity=0)
    with transaction.atomic():
        build(a)


def build(a):
    en = Locale.objects.get_or_create(language_code="en")[0]
    de = Locale.objects.get_or_create(language_code="de")[0]
    for p in Page.get_first_root_node().get_children():
        p.delete()
    root = Page.get_first_root_node()
    images, docs = make_media(a.images, a.docs)
    home = add(root, ArticlePage(title="Home", slug="home", locale=en, intro="Welcome"))
    Site.objects.update_or_create(is_default_site=True, defaults={"hostname": "cms.test", "root_page": home})
    about = add(home, ArticlePage(title="About", slug="about", locale=en, body="<p>About us.</p>"))
    news = add(home, SectionPage(title="News", slug="news", locale=en))
    sections, topics, articles = [], [], []
    for i in range(a.sections):
        s = add(news, SectionPage(title=f"Section {i}", slug=f"section-{i}", locale=en, seo_title=f"Section {i} | News"))
        sections.append(s)
        for j in range(a.topics):
            t = add(s, SectionPage(title=f"Topic {i}.{j}", slug=f"topic-{i}-{j}", locale=en))
            topics.append(t)
            for k in range(a.articles):
                art = ArticlePage(
                    title=f"Article {i}.{j}.{k}",
                    slug=f"article-{i}-{j}-{k}",
                    locale=en,
                    intro=f"Intro {i}.{j}.{k}",
                    search_description=f"About article {i}.{j}.{k}",
                )
                articles.append(add(t, art))
    # Links need every page's id: bodies are written once all pages exist.
    n = len(articles)
    for idx, art in enumerate(articles):
        art.body = article_body(
            articles[idx - 1] if idx > 0 else None,
            articles[idx + 1] if idx + 1 < n else None,
            docs[idx % len(docs)],
            images[idx % len(images)],
            about if idx == 0 else None,
        )
        art.hero_image = images[(idx + 1) % len(images)]
        art.attachment = docs[idx % len(docs)]
        art.related_page = articles[(idx + a.articles) % n]
        publish(art)
    for s in [news] + sections + topics:
        first = s.get_descendants().type(ArticlePage).live().first()
        if first is not None:
            s.body = section_body(first.specific, docs[0], images[s.id % len(images)], s.title)
            publish(s)
    # German: home, news and every section, every other topic and article.
    home_de = translate(home, de, title="Startseite")
    translate(about, de, title="Über uns")
    news_de = translate(news, de, title="Nachrichten")
    by_en = {home.id: home_de, news.id: news_de}
    for s in sections:
        by_en[s.id] = translate(s, de, title=s.title.replace("Section", "Rubrik"))
    for idx, t in enumerate(topics):
        if idx % 2 == 0:
            by_en[t.id] = translate(t, de, title=t.title.replace("Topic", "Thema"))
    de_articles = []
    for idx, art in enumerate(articles):
        if art.get_parent().id in by_en and idx % 2 == 0:
            de_articles.append(translate(art, de, title=art.title.replace("Article", "Artikel")))
    for idx, art in enumerate(de_articles):
        art.body = article_body(
            de_articles[idx - 1] if idx > 0 else None,
            de_articles[idx + 1] if idx + 1 < len(de_articles) else None,
            docs[-1],
            images[-1],
            None,
        )
        publish(art)
    # Editors at work: a draft change on a live page, an unpublished page, a page never
    # published.
    draft = articles[1]
    draft.title = "Article with a draft title"
    draft.save_revision()
    articles[2].unpublish()
    topics[0].add_child(
        instance=ArticlePage(title="Never published", slug="never-published", locale=en, live=False)
    )
    summary = {
        "home": home.id,
        "about": about.id,
        "news": news.id,
        "section_0": sections[0].id,
        "first_article": articles[0].id,
        "draft": draft.id,
        "unpublished": articles[2].id,
        "pages": Page.objects.filter(depth__gt=1).count(),
        "live_in_news": sum(
            r.get_descendants(inclusive=True).live().count() for r in (news, news_de)
        ),
        "images": [i.file.name for i in images],
        "documents": [d.file.name for d in docs],
    }
    json.dump(summary, sys.stdout, indent=1)
    print()


def bulk(a):
    """A large site for the page benchmark, still through Wagtail's API but with one
    publish per page: `--sections` x `--topics` x `--articles` English articles, each
    linking back to the one before it in rich text and by foreign key and using an image
    and a document; German translations of every section, topic and every other article."""
    call_command("migrate", verbosity=0)
    with transaction.atomic():
        en = Locale.objects.get_or_create(language_code="en")[0]
        de = Locale.objects.get_or_create(language_code="de")[0]
        for p in Page.get_first_root_node().get_children():
            p.delete()
        images, docs = make_media(a.images, a.docs)
        home = add(Page.get_first_root_node(), ArticlePage(title="Home", slug="home", locale=en))
        Site.objects.update_or_create(is_default_site=True, defaults={"hostname": "cms.test", "root_page": home})
        news = add(home, SectionPage(title="News", slug="news", locale=en))
        translate(home, de, title="Startseite")
        news_de = translate(news, de, title="Nachrichten")
        n = 0
        for i in range(a.sections):
            s = add(news, SectionPage(title=f"Section {i}", slug=f"section-{i}", locale=en))
            translate(s, de, title=f"Rubrik {i}")
            for j in range(a.topics):
                t = add(s, SectionPage(title=f"Topic {i}.{j}", slug=f"topic-{i}-{j}", locale=en))
                translate(t, de, title=f"Thema {i}.{j}")
                prev = None
                for k in range(a.articles):
                    art = ArticlePage(
                        title=f"Article {i}.{j}.{k}",
                        slug=f"article-{i}-{j}-{k}",
                        locale=en,
                        intro=f"Intro {i}.{j}.{k}",
                        body=article_body(prev, None, docs[n % len(docs)], images[n % len(images)], None),
                        hero_image=images[(n + 1) % len(images)],
                        related_page=prev,
                    )
                    prev = add(t, art)
                    if k % 2 == 0:
                        translate(prev, de, title=f"Artikel {i}.{j}.{k}")
                    n += 1
            print(f"section {i + 1}/{a.sections}", file=sys.stderr, flush=True)
    summary = {
        "home": home.id,
        "news": news.id,
        "news_de": news_de.id,
        "pages": Page.objects.filter(depth__gt=1).count(),
        "live_in_news": sum(r.get_descendants(inclusive=True).live().count() for r in (news, news_de)),
    }
    json.dump(summary, sys.stdout, indent=1)
    print()


def transfer_import(a):
    """The peer: wagtail-transfer imports subtrees of the source CMS (served at
    CMS_TRANSFER_SOURCE) into this CMS, exactly as its admin view `import_page` does
    (fetch the export, plan, fetch missing objects, run). `--pages` lists source page ids,
    each with the locale of the destination parent it goes under (`4:en,6:de`); the
    destination's home page gets a German translation for the German subtree. Prints the
    seconds of each import round (the first creates, the second updates everything again)."""
    import time

    import requests
    from django.conf import settings
    from wagtail_transfer.auth import digest_for_source, requests_auth
    from wagtail_transfer.operations import ImportPlanner
    from wagtail_transfer.views import import_missing_object_data

    call_command("migrate", verbosity=0)
    base_url = settings.WAGTAILTRANSFER_SOURCES["source"]["BASE_URL"]
    home = Page.objects.get(depth=2, locale__language_code="en")
    de = Locale.objects.get_or_create(language_code="de")[0]
    if not Page.objects.filter(depth=2, locale=de).exists():
        translate(home.specific, de, title="Startseite")
    parents = {"en": home.id, "de": Page.objects.get(depth=2, locale=de).id}
    rounds = []
    for _ in range(a.rounds):
        t = time.monotonic()
        for item in a.pages.split(","):
            source_id, lang = item.split(":")
            resp = requests.get(
                f"{base_url}api/pages/{source_id}/",
                auth=requests_auth("source"),
                params={"digest": digest_for_source("source", source_id)},
            )
            resp.raise_for_status()
            importer = ImportPlanner.for_page(source=source_id, destination=parents[lang], source_site="source")
            importer.add_json(resp.content)
            import_missing_object_data("source", importer)
        rounds.append(time.monotonic() - t)
    live = Page.objects.filter(depth__gt=2).live().count()
    json.dump({"seconds": rounds, "pages": live}, sys.stdout)
    print()


def api_dump(a):
    """Wagtail's own API v2 answers for every live page of the subtree (both locales):
    detail views, with every API field."""
    from django.test import Client

    c = Client(HTTP_HOST="cms.test")
    roots = Page.objects.filter(url_path__endswith=a.root.split("/")[-2] + "/", depth=3)
    out = []
    for r in roots:
        for p in r.get_descendants(inclusive=True).live().order_by("path"):
            resp = c.get(f"/api/v2/pages/{p.id}/")
            if resp.status_code != 200:
                raise SystemExit(f"api: page {p.id}: {resp.status_code} {resp.content[:200]!r}")
            out.append(resp.json())
    json.dump(out, sys.stdout, indent=1)
    print()


def retitle(a):
    """Publishes a new title for page `--id`, as an editor would."""
    page = Page.objects.get(id=a.id).specific
    page.title = a.title
    publish(page)


def reslug(a):
    """Publishes a new slug for page `--id` (its URL and its descendants' change)."""
    page = Page.objects.get(id=a.id).specific
    page.slug = a.slug
    publish(page)


@transaction.atomic
def mutate(a):
    """An editor's day: a subtree moved, a slug renamed, siblings reordered, a page
    deleted, one unpublished, the draft published, an image replaced. Prints what was
    done (ids)."""
    en = Locale.objects.get(language_code="en")
    news = Page.objects.get(url_path="/home/news/", locale=en)
    s1 = news.get_children().get(slug="section-1")
    s2 = news.get_children().get(slug="section-2")
    moved = s1.get_children().get(slug="topic-1-0")
    moved.move(s2, pos="last-child")
    renamed = s2.get_children().get(slug="topic-2-1").specific
    renamed.slug = "renamed-topic"
    publish(renamed)
    s2 = Page.objects.get(id=s2.id)
    s2.move(news, pos="first-child")
    deleted = Page.objects.get(url_path="/home/news/section-0/topic-0-1/article-0-1-1/")
    deleted_id = deleted.id
    deleted.delete()
    unpublished = Page.objects.get(url_path="/home/news/section-1/topic-1-1/article-1-1-1/")
    unpublished.unpublish()
    draft = Page.objects.get(url_path="/home/news/section-0/topic-0-0/article-0-0-1/")
    draft.get_latest_revision().publish()
    image = Image.objects.get(title="picture 1")
    image.file = ContentFile(png(99), name="picture-1-replaced.png")
    image.save()
    json.dump(
        {
            "moved": moved.id,
            "renamed": renamed.id,
            "reordered": s2.id,
            "deleted": deleted_id,
            "unpublished": unpublished.id,
            "published_draft": draft.id,
            "image": image.file.name,
        },
        sys.stdout,
    )
    print()


@transaction.atomic
def edit(a):
    """Publishes a new title for `--percent` of the live articles of the news subtrees
    (every n-th), as a day's edits would; prints how many."""
    arts = list(ArticlePage.objects.live().filter(url_path__contains="/news/").order_by("path"))
    step = max(1, round(100 / a.percent))
    done = 0
    for art in arts[::step]:
        art.title = f"{art.title} (edited)"
        publish(art)
        done += 1
    print(done)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    # The site's shape: sections x topics x articles, and its media.
    for name, defaults in (("generate", (3, 2, 3, 4, 2)), ("bulk", (10, 10, 66, 20, 10))):
        g = sub.add_parser(name)
        for arg, default in zip(("sections", "topics", "articles", "images", "docs"), defaults):
            g.add_argument(f"--{arg}", type=int, default=default)
    x = sub.add_parser("transfer-import")
    x.add_argument("--pages", required=True)
    x.add_argument("--rounds", type=int, default=2)
    d = sub.add_parser("api-dump")
    d.add_argument("--root", default="/home/news/")
    r = sub.add_parser("retitle")
    r.add_argument("--id", type=int, required=True)
    r.add_argument("--title", required=True)
    r = sub.add_parser("reslug")
    r.add_argument("--id", type=int, required=True)
    r.add_argument("--slug", required=True)
    sub.add_parser("mutate")
    e = sub.add_parser("edit")
    e.add_argument("--percent", type=float, default=1.0)
    a = ap.parse_args()
    commands = {
        "generate": generate,
        "bulk": bulk,
        "transfer-import": transfer_import,
        "api-dump": api_dump,
        "retitle": retitle,
        "reslug": reslug,
        "mutate": mutate,
        "edit": edit,
    }
    commands[a.cmd](a)


if __name__ == "__main__":
    main()
