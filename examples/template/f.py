"""A function with a package: Jinja2, from requirements.txt, installed by sprout when
the function is registered (or, embedded, before the first invoke)."""

import jinja2

TEMPLATE = jinja2.Template("Hello, {{ name | title }}! (Jinja2 {{ version }})")


def f(event):
    return TEMPLATE.render(name=event.get("name", "stranger"), version=jinja2.__version__)
