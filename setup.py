"""evl-nb packaging. The library in `evl_nb/` is exported from the notebooks in `nbs/` by nbdev."""
from configparser import ConfigParser
from pathlib import Path
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent / 'settings.ini')
cfg = cfg['DEFAULT']

requirements = [
    'torch>=2.1', 'torchvision>=0.16', 'open_clip_torch>=2.24,<4', 'numpy>=1.22',
    'decord>=0.6', 'av>=11', 'matplotlib>=3.6', 'ipywidgets>=8', 'papermill>=2.4', 'tqdm>=4.60',
]
dev_requirements = [
    'nbdev==2.4.14', 'fastcore==1.14.5', 'execnb==0.1.18', 'ghapi==1.1.1',
    'pytest>=7', 'ipykernel>=6', 'jupyterlab>=4', 'playwright>=1.40', 'submitit>=1.5',
]

setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'], keywords=cfg['keywords'].split(),
    long_description=(Path(__file__).parent / 'README.md').read_text(), long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], license='Apache-2.0', url=cfg['git_url'],
    project_urls={'Source': cfg['git_url']},
    packages=find_packages(include=['evl_nb', 'evl_nb.*']), include_package_data=True,
    python_requires='>=' + cfg['min_python'], install_requires=requirements,
    extras_require={'dev': dev_requirements, 'tensorboard': ['tensorboard'], 'slurm': ['submitit>=1.5']},
    entry_points={'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
                  'console_scripts': ['evl-nb=evl_nb.cli:main']},
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
)
