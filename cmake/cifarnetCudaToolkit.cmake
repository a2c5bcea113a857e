# Prepares find_package(Torch) for a CUDA build of torch. Include this file, then find Torch.
#
# torch's config looks for the CUDA toolkit torch was built with, and stops with a fatal error
# when it finds none ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA
# libraries"), even though the cifarnet ops link only torch_cpu. Its guess for the toolkit is
# the folder above the first nvcc on PATH, which is wrong when nvcc is a wrapper script such as
# /usr/local/bin/nvcc (it gives /usr/local). So this file picks the toolkit first:
#
#   CUDA_TOOLKIT_ROOT_DIR or CUDAToolkit_ROOT set   that folder; set but empty means "none"
#   neither set                                     $CUDA_HOME, $CUDA_PATH, the folder the nvcc
#                                                   on PATH runs from, /usr/local/cuda
#
# A folder counts only if it has bin/nvcc, include/cuda_runtime.h and libcudart. That is the
# same test tools/cuda_toolkit.py applies. tools/run_tests.sh passes the script's answer. The
# search here is for builds that don't run the script, such as users of the installed package.
# With a usable folder, torch's search is pointed at it and at its nvcc. With none, it defines
# an empty torch::cudart target.
# NB: torch::cudart is the include guard of torch's CUDA search (Caffe2/public/cuda.cmake), so
# defining it skips the search. torch's CPU targets (torch_cpu, c10) then work as usual. Its
# CUDA targets (torch, torch_cuda, c10_cuda) lack the CUDA runtime, so link the CPU ones.
#
# Sets CIFARNET_CUDA_TOOLKIT_ROOT to the folder chosen, or to empty when there is none.
include_guard(GLOBAL)

# Sets <result> to TRUE if <root> has bin/nvcc, include/cuda_runtime.h and libcudart.
function(_cifarnet_cuda_toolkit_usable root result)
  set(usable FALSE)
  if(NOT root STREQUAL "" AND EXISTS "${root}/bin/nvcc"
     AND EXISTS "${root}/include/cuda_runtime.h")
    file(GLOB cudart "${root}/lib64/libcudart.so*" "${root}/lib/libcudart.so*"
         "${root}/targets/*/lib/libcudart.so*")
    if(cudart)
      set(usable TRUE)
    endif()
  endif()
  set(${result} ${usable} PARENT_SCOPE)
endfunction()

# Sets <result> to the toolkit folder of the nvcc on PATH, even if that nvcc is a wrapper script.
function(_cifarnet_nvcc_root result)
  set(root "")
  find_program(_cifarnet_nvcc nvcc PATHS ENV PATH NO_DEFAULT_PATH)
  set(nvcc "${_cifarnet_nvcc}")
  unset(_cifarnet_nvcc CACHE)  # look again at the next configure: PATH may change
  if(nvcc)
    # `nvcc --dryrun` prints `#$ _HERE_=<folder of the real compiler>` and runs nothing.
    execute_process(COMMAND "${nvcc}" --dryrun -x cu -c /dev/null -o /dev/null
                    OUTPUT_VARIABLE out ERROR_VARIABLE out TIMEOUT 60)
    if(out MATCHES "#\\$ _HERE_=([^\n]+)")
      get_filename_component(root "${CMAKE_MATCH_1}" DIRECTORY)
    endif()
  endif()
  set(${result} "${root}" PARENT_SCOPE)
endfunction()

function(_cifarnet_prepare_torch_cuda)
  if(TARGET torch::cudart OR TARGET torch_cpu)
    return()  # Torch was already found in this directory. Keep what it found.
  endif()
  if(DEFINED CUDA_TOOLKIT_ROOT_DIR)
    set(candidates "${CUDA_TOOLKIT_ROOT_DIR}")
    set(looked_at "CUDA_TOOLKIT_ROOT_DIR='${CUDA_TOOLKIT_ROOT_DIR}'")
  elseif(DEFINED CUDAToolkit_ROOT)
    set(candidates "${CUDAToolkit_ROOT}")
    set(looked_at "CUDAToolkit_ROOT='${CUDAToolkit_ROOT}'")
  else()
    _cifarnet_nvcc_root(nvcc_root)
    set(candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" "${nvcc_root}" /usr/local/cuda)
    list(REMOVE_ITEM candidates "")
    string(REPLACE ";" ", " looked_at "looked at ${candidates}")
  endif()
  set(root "")
  foreach(candidate IN LISTS candidates)
    _cifarnet_cuda_toolkit_usable("${candidate}" usable)
    if(usable)
      set(root "${candidate}")
      break()
    endif()
  endforeach()

  if(root)
    message(STATUS "cifarnet: CUDA toolkit for torch's CMake config: ${root}")
    set(CUDA_TOOLKIT_ROOT_DIR "${root}" PARENT_SCOPE)
    set(CUDAToolkit_ROOT "${root}" PARENT_SCOPE)
    if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
      # Otherwise CMake takes the first nvcc on PATH, which may belong to another toolkit.
      set(CMAKE_CUDA_COMPILER "${root}/bin/nvcc" PARENT_SCOPE)
    endif()
  else()
    message(STATUS "cifarnet: no usable CUDA toolkit (${looked_at}); skipping torch's CUDA "
                   "targets, since its CPU targets are all cifarnet needs")
    add_library(torch::cudart INTERFACE IMPORTED)
  endif()
  set(CIFARNET_CUDA_TOOLKIT_ROOT "${root}" PARENT_SCOPE)
endfunction()

_cifarnet_prepare_torch_cuda()
