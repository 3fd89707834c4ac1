"""Packaging beyond pyproject.toml: the shipped configs.

The configs live at the top of the repo (configs/..., the paths the docs use);
a wheel carries them as package data in musicjax/configs/, where
`musicjax --config lm/tiny` finds them by name (musicjax/config.py: resolve).
pyproject.toml cannot map a folder outside the package into it next to
automatic package discovery, hence this file.
"""
import os

from setuptools import find_packages, setup

_CONFIG_PACKAGES = ['musicjax.configs'] + [
    'musicjax.configs.' + d for d in sorted(os.listdir('configs'))
    if os.path.isdir(os.path.join('configs', d)) and not d.startswith(('_', '.'))
]

setup(
    packages=find_packages(include=['musicjax*']) + _CONFIG_PACKAGES,
    package_dir={'musicjax.configs': 'configs'},
)
