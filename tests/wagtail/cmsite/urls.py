from django.conf.urls.i18n import i18n_patterns
from django.urls import include, path
from wagtail import urls as wagtail_urls
from wagtail.api.v2.router import WagtailAPIRouter
from wagtail.api.v2.views import PagesAPIViewSet
from wagtail.documents.api.v2.views import DocumentsAPIViewSet
from wagtail.images.api.v2.views import ImagesAPIViewSet
from django.conf import settings

api = WagtailAPIRouter("wagtailapi")
api.register_endpoint("pages", PagesAPIViewSet)
api.register_endpoint("images", ImagesAPIViewSet)
api.register_endpoint("documents", DocumentsAPIViewSet)

from wagtail.documents import urls as wagtaildocs_urls

urlpatterns = [path("api/v2/", api.urls), path("documents/", include(wagtaildocs_urls))]
if "wagtail_transfer" in settings.INSTALLED_APPS:
    from wagtail_transfer import urls as wagtailtransfer_urls

    from django.urls import re_path
    from django.views.static import serve

    urlpatterns.append(path("wagtail-transfer/", include(wagtailtransfer_urls)))
    # wagtail-transfer downloads images and documents from the source's media URL.
    urlpatterns.append(re_path(r"^media/(?P<path>.*)$", serve, {"document_root": settings.MEDIA_ROOT}))
# Pages under a language prefix (/en/..., /de/...), as multilingual Wagtail sites are.
urlpatterns += i18n_patterns(path("", include(wagtail_urls)))
