from setuptools import setup

setup(cffi_modules=["blocksnap/_build.py:ffibuilder"])
