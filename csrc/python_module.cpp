// The Python module internimage._C. Importing it loads this library, whose static
// registrations (csrc/schemas.cpp and the kernel files) fill torch.ops.internimage; its one
// function, cpu_isa(), names the instruction-set build the CPU kernels dispatch to
// ("avx512", "avx2", "baseline"; "generic" off x86-64), for tests and bug reports.
#include <Python.h>

#include "cpu/cpu_dispatch.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
#ifdef DCNV3_X86_DISPATCH
  switch (internimage::cpu_level()) {
    case internimage::CpuLevel::kAvx512:
      return PyUnicode_FromString("avx512");
    case internimage::CpuLevel::kAvx2:
      return PyUnicode_FromString("avx2");
    case internimage::CpuLevel::kBaseline:
      break;
  }
  return PyUnicode_FromString("baseline");
#else
  return PyUnicode_FromString("generic");
#endif
}

PyMethodDef module_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
