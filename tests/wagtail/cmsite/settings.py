"""Settings of the test CMS: a Wagtail site with two locales, its database and media
directory from the environment.

CMS_DB: sqlite:///PATH (default ./cms.sqlite3) or postgres://USER@HOST:PORT/NAME
CMS_MEDIA_ROOT: where uploaded images and documents go (default ./media)
"""
import os
from pathlib import Path
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "test-cms-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "testsite",
    "wagtail.api.v2",
    "wagtail.contrib.simple_translation",
    "wagtail.embeds",
    "wagtail.sites",
    "wagtail.users",
    "wagtail.snippets",
    "wagtail.documents",
    "wagtail.images",
    "wagtail.search",
    "wagtail.admin",
    "wagtail",
    "modelcluster",
    "taggit",
    "rest_framework",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]
if os.environ.get("CMS_TRANSFER_SOURCE"):
    INSTALLED_APPS.insert(1, "wagtail_transfer")

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "cmsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database(url):
    u = urlparse(url)
    if u.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": u.path or "cms.sqlite3"}
    if u.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": u.path.lstrip("/"),
            "USER": u.username or "postgres",
            "PASSWORD": u.password or "",
            "HOST": u.hostname or "127.0.0.1",
            "PORT": u.port or 5432,
        }
    raise ValueError(f"CMS_DB: unsupported database URL {url!r}")


DATABASES = {"default": _database(os.environ.get("CMS_DB", f"sqlite:///{BASE_DIR}/cms.sqlite3"))}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

LANGUAGE_CODE = "en"
LANGUAGES = WAGTAIL_CONTENT_LANGUAGES = [("en", "English"), ("de", "German")]
WAGTAIL_I18N_ENABLED = True
USE_I18N = True
USE_TZ = True
TIME_ZONE = "UTC"

STATIC_URL = "/static/"
MEDIA_ROOT = os.environ.get("CMS_MEDIA_ROOT", str(BASE_DIR / "media"))
MEDIA_URL = "/media/"
# Documents link straight to their files (as the mirrored files are served).
WAGTAILDOCS_SERVE_METHOD = "direct"

WAGTAIL_SITE_NAME = "test cms"
# wagtail-transfer's export names files by this URL, so a transfer source serves itself.
WAGTAILADMIN_BASE_URL = os.environ.get("CMS_TRANSFER_SOURCE", "http://cms.test")
# Renditions and search indexes are not what is mirrored; keep the generator fast.
WAGTAILSEARCH_BACKENDS = {"default": {"BACKEND": "wagtail.search.backends.database", "AUTO_UPDATE": False}}
WAGTAILIMAGES_FEATURE_DETECTION_ENABLED = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

WAGTAILTRANSFER_SECRET_KEY = "test-transfer-key"
WAGTAILTRANSFER_SOURCES = {
    "source": {
        "BASE_URL": os.environ.get("CMS_TRANSFER_SOURCE", "http://127.0.0.1:0") + "/wagtail-transfer/",
        "SECRET_KEY": "test-transfer-key",
    }
}
# Pages point at their latest revision and revisions at their page, which wagtail-transfer
# 0.11 reports as a circular dependency (wagtail/wagtail-transfer#163); not following
# revisions lets it import, and it saves a revision of each imported page itself.
WAGTAILTRANSFER_NO_FOLLOW_MODELS = ["wagtailcore.page", "contenttypes.contenttype", "wagtailcore.revision"]
