"""genfill for Krita: a docker and a menu action that fill the selection through a local
genfill server. The bridge it talks through is bundled as ``genfill_krita.genfill_bridge``."""

from krita import DockWidgetFactory, DockWidgetFactoryBase, Krita

from .docker import DOCKER_ID, GenfillDocker
from .extension import GenfillExtension

_app = Krita.instance()
_app.addExtension(GenfillExtension(_app))
_app.addDockWidgetFactory(DockWidgetFactory(DOCKER_ID, DockWidgetFactoryBase.DockRight, GenfillDocker))
