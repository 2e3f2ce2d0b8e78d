"""Page types of the test CMS: a rich-text article with foreign keys to an image, a
document and another page; a section whose body is a StreamField with every kind of
reference (rich text, image, document and page choosers, a struct with choosers)."""
from django.db import models
from wagtail import blocks
from wagtail.api import APIField
from wagtail.documents.blocks import DocumentChooserBlock
from wagtail.fields import RichTextField, StreamField
from wagtail.images.blocks import ImageChooserBlock
from wagtail.models import Page


class ArticlePage(Page):
    intro = models.CharField(max_length=250, blank=True)
    body = RichTextField(blank=True)
    hero_image = models.ForeignKey(
        "wagtailimages.Image", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    attachment = models.ForeignKey(
        "wagtaildocs.Document", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    related_page = models.ForeignKey(
        "wagtailcore.Page", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    api_fields = [
        APIField("intro"),
        APIField("body"),
        APIField("hero_image"),
        APIField("attachment"),
        APIField("related_page"),
    ]


class SectionPage(Page):
    body = StreamField(
        [
            ("heading", blocks.CharBlock()),
            ("paragraph", blocks.RichTextBlock()),
            ("image", ImageChooserBlock()),
            ("document", DocumentChooserBlock()),
            ("page", blocks.PageChooserBlock()),
            (
                "card",
                blocks.StructBlock(
                    [
                        ("title", blocks.CharBlock()),
                        ("link", blocks.PageChooserBlock(required=False)),
                        ("image", ImageChooserBlock(required=False)),
                    ]
                ),
            ),
        ],
        blank=True,
    )

    api_fields = [APIField("body")]
