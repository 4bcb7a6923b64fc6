/* The part of UCX's ucp API that ucx.c uses, declared here so that libckpt builds where
 * UCX's headers are absent: UCX is loaded at run time (dlopen), as NCCL is. Layouts and
 * values are those of ucp API 1.x (checked against 1.13); the parameter structs only grow at
 * their ends and UCX reads a field only when its field_mask bit is set. test/ucx_abi_check.c
 * compares every declaration here with UCX's own headers where they are installed. */
#ifndef CKPT_UCX_ABI_H
#define CKPT_UCX_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

typedef int8_t ux_status;   /* ucs_status_t: a packed enum, one byte */
#define UX_OK 0
#define UX_INPROGRESS 1
#define UX_ERR_BUSY (-15)
#define UX_ERR_CANCELED (-16)
#define UX_ERR_LAST (-100)
/* ucs_status_ptr_t: NULL (done), an error code, or a request. */
#define UX_PTR_IS_ERR(p) (((uintptr_t)(p)) >= ((uintptr_t)UX_ERR_LAST))
#define UX_PTR_STATUS(p) ((ux_status)(intptr_t)(p))

typedef struct ux_context *ux_context_h;
typedef struct ux_config ux_config;
typedef struct ux_worker *ux_worker_h;
typedef struct ux_ep *ux_ep_h;
typedef struct ux_listener *ux_listener_h;
typedef struct ux_conn_request *ux_conn_request_h;

enum {
  UX_PARAM_FIELD_FEATURES = 1u << 0,
  UX_PARAM_FIELD_NAME = 1u << 8,
  UX_FEATURE_WAKEUP = 1u << 4,
  UX_FEATURE_AM = 1u << 6,
  UX_WORKER_PARAM_FIELD_THREAD_MODE = 1u << 0,
  UX_THREAD_MODE_SINGLE = 0,
  UX_LISTENER_PARAM_FIELD_SOCK_ADDR = 1u << 0,
  UX_LISTENER_PARAM_FIELD_CONN_HANDLER = 1u << 2,
  UX_LISTENER_ATTR_FIELD_SOCKADDR = 1u << 0,
  UX_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR = 1u << 0,
  UX_EP_PARAM_FIELD_ERR_HANDLING_MODE = 1u << 1,
  UX_EP_PARAM_FIELD_ERR_HANDLER = 1u << 2,
  UX_EP_PARAM_FIELD_SOCK_ADDR = 1u << 4,
  UX_EP_PARAM_FIELD_FLAGS = 1u << 5,
  UX_EP_PARAM_FIELD_CONN_REQUEST = 1u << 6,
  UX_EP_PARAMS_FLAGS_CLIENT_SERVER = 1u << 0,
  UX_ERR_HANDLING_MODE_PEER = 1,
  UX_EP_CLOSE_FLAG_FORCE = 1u << 0,
  UX_OP_ATTR_FIELD_CALLBACK = 1u << 1,
  UX_OP_ATTR_FIELD_USER_DATA = 1u << 2,
  UX_OP_ATTR_FIELD_FLAGS = 1u << 4,
  UX_OP_ATTR_FIELD_MEMORY_TYPE = 1u << 6,
  UX_OP_ATTR_FLAG_NO_IMM_CMPL = 1u << 16,
  UX_MEMORY_TYPE_HOST = 0,
  UX_AM_HANDLER_PARAM_FIELD_ID = 1u << 0,
  UX_AM_HANDLER_PARAM_FIELD_FLAGS = 1u << 1,
  UX_AM_HANDLER_PARAM_FIELD_CB = 1u << 2,
  UX_AM_HANDLER_PARAM_FIELD_ARG = 1u << 3,
  UX_AM_FLAG_WHOLE_MSG = 1u << 0,
  UX_AM_SEND_FLAG_REPLY = 1u << 0,
  UX_AM_RECV_ATTR_FIELD_REPLY_EP = 1u << 0,
  UX_AM_RECV_ATTR_FLAG_DATA = 1u << 16,
  UX_AM_RECV_ATTR_FLAG_RNDV = 1u << 17,
};

typedef struct ux_sock_addr {
  const struct sockaddr *addr;
  socklen_t addrlen;
} ux_sock_addr;

typedef struct ux_params {
  uint64_t field_mask;
  uint64_t features;
  size_t request_size;
  void (*request_init)(void *request);
  void (*request_cleanup)(void *request);
  uint64_t tag_sender_mask;
  int mt_workers_shared;
  size_t estimated_num_eps;
  size_t estimated_num_ppn;
  const char *name;
} ux_params;

typedef struct ux_worker_params {
  uint64_t field_mask;
  int thread_mode;
  /* The rest (cpu mask onwards) is never set here: its fields' bits stay clear. */
} ux_worker_params;

typedef void (*ux_conn_cb)(ux_conn_request_h request, void *arg);
typedef struct ux_listener_params {
  uint64_t field_mask;
  ux_sock_addr sockaddr;
  struct { void (*cb)(ux_ep_h ep, void *arg); void *arg; } accept_handler;
  struct { ux_conn_cb cb; void *arg; } conn_handler;
} ux_listener_params;

typedef struct ux_listener_attr {
  uint64_t field_mask;
  struct sockaddr_storage sockaddr;
} ux_listener_attr;

typedef struct ux_conn_request_attr {
  uint64_t field_mask;
  struct sockaddr_storage client_address;
  uint64_t client_id;
} ux_conn_request_attr;

typedef void (*ux_err_cb)(void *arg, ux_ep_h ep, ux_status status);
typedef struct ux_ep_params {
  uint64_t field_mask;
  const void *address;
  int err_mode;
  struct { ux_err_cb cb; void *arg; } err_handler;
  void *user_data;
  unsigned flags;
  ux_sock_addr sockaddr;
  ux_conn_request_h conn_request;
  const char *name;
  ux_sock_addr local_sockaddr;
} ux_ep_params;

typedef void (*ux_send_cb)(void *request, ux_status status, void *user_data);
typedef void (*ux_recv_am_cb)(void *request, ux_status status, size_t length, void *user_data);
typedef struct ux_request_param {
  uint32_t op_attr_mask;
  uint32_t flags;
  void *request;
  union {
    ux_send_cb send;
    ux_recv_am_cb recv_am;
  } cb;
  uint64_t datatype;
  void *user_data;
  void *reply_buffer;
  int memory_type;
  union { size_t *length; void *tag_info; } recv_info;
  void *memh;
} ux_request_param;

typedef struct ux_am_recv_param {
  uint64_t recv_attr;
  ux_ep_h reply_ep;
} ux_am_recv_param;

typedef ux_status (*ux_am_recv_cb)(void *arg, const void *header, size_t header_length, void *data,
                                   size_t length, const ux_am_recv_param *param);
typedef struct ux_am_handler_param {
  uint64_t field_mask;
  unsigned id;
  uint32_t flags;
  ux_am_recv_cb cb;
  void *arg;
} ux_am_handler_param;

/* The functions, resolved by name from libucp (ucs_status_string comes with it, from libucs). */
typedef struct ux_api {
  void (*get_version)(unsigned *major, unsigned *minor, unsigned *release);
  ux_status (*config_read)(const char *env_prefix, const char *filename, ux_config **config);
  ux_status (*config_modify)(ux_config *config, const char *name, const char *value);
  void (*config_release)(ux_config *config);
  ux_status (*init_version)(unsigned major, unsigned minor, const ux_params *params, const ux_config *config,
                            ux_context_h *context);
  void (*cleanup)(ux_context_h context);
  ux_status (*worker_create)(ux_context_h context, const ux_worker_params *params, ux_worker_h *worker);
  void (*worker_destroy)(ux_worker_h worker);
  unsigned (*worker_progress)(ux_worker_h worker);
  ux_status (*worker_get_efd)(ux_worker_h worker, int *fd);
  ux_status (*worker_arm)(ux_worker_h worker);
  ux_status (*worker_signal)(ux_worker_h worker);
  ux_status (*worker_set_am_recv_handler)(ux_worker_h worker, const ux_am_handler_param *param);
  ux_status (*listener_create)(ux_worker_h worker, const ux_listener_params *params, ux_listener_h *listener);
  void (*listener_destroy)(ux_listener_h listener);
  ux_status (*listener_query)(ux_listener_h listener, ux_listener_attr *attr);
  ux_status (*listener_reject)(ux_listener_h listener, ux_conn_request_h request);
  ux_status (*conn_request_query)(ux_conn_request_h request, ux_conn_request_attr *attr);
  ux_status (*ep_create)(ux_worker_h worker, const ux_ep_params *params, ux_ep_h *ep);
  void *(*ep_close_nbx)(ux_ep_h ep, const ux_request_param *param);
  void *(*am_send_nbx)(ux_ep_h ep, unsigned id, const void *header, size_t header_length, const void *buffer,
                       size_t count, const ux_request_param *param);
  void *(*am_recv_data_nbx)(ux_worker_h worker, void *data_desc, void *buffer, size_t count,
                            const ux_request_param *param);
  void (*am_data_release)(ux_worker_h worker, void *data);
  ux_status (*request_check_status)(void *request);
  void (*request_free)(void *request);
  const char *(*status_string)(ux_status status);
} ux_api;

/* The ucp API version requested of ucp_init_version. */
#define UX_API_MAJOR 1
#define UX_API_MINOR 13

#endif /* CKPT_UCX_ABI_H */
