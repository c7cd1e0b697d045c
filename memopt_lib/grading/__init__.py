"""The autograder (``memopt-grade``): placeholder docstring, replaced below."""
