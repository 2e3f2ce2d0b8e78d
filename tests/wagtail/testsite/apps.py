from django.apps import AppConfig


class TestsiteConfig(AppConfig):
    name = "testsite"
    default_auto_field = "django.db.models.AutoField"
