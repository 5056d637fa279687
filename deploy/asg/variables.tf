variable "name" {
  type        = string
  description = "Name of the fleet: prefixes every resource; also the Auto Scaling group's name, which the instances use to find their peers and to complete their termination lifecycle action."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,20}$", var.name))
    error_message = "The name must be 1-21 lower-case letters, digits or '-', starting with a letter or digit (target group names add '-PORT' and are limited to 32 characters)."
  }
}

variable "vpc_id" {
  type        = string
  description = "VPC the appliance fleet and its internal NLB run in."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets, one per availability zone, for the instances and the NLB. Use at least two zones."

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "Give at least two subnet_ids in different availability zones, so the fleet survives a zone failure."
  }
}

variable "ami_id" {
  type        = string
  description = "AMI built by images/packer (Envoy, fwdproxy, systemd units, node exporter)."

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "The ami_id must look like ami-0123456789abcdef0."
  }
}

variable "instance_type" {
  type        = string
  default     = "c7i.large"
  description = "Instance type of the appliances; must match the AMI's architecture (e.g. c7g.large for arm64)."
}

variable "min_size" {
  type        = number
  default     = 2
  description = "Minimum number of instances; keep at least one per zone."

  validation {
    condition     = var.min_size >= 1
    error_message = "The min_size must be at least 1."
  }
}

variable "max_size" {
  type        = number
  default     = 6
  description = "Maximum number of instances."
}

variable "desired_capacity" {
  type        = number
  default     = null
  description = "Initial number of instances; null starts at min_size. Later changes by scaling policies are kept (ignored by Terraform)."
}

variable "cpu_target_percent" {
  type        = number
  default     = 50
  description = "Target average CPU utilisation for the target-tracking scaling policy; null disables the policy."

  validation {
    condition     = var.cpu_target_percent == null ? true : (var.cpu_target_percent > 0 && var.cpu_target_percent < 100)
    error_message = "The cpu_target_percent must be between 0 and 100 (exclusive), or null."
  }
}

variable "listener_ports" {
  type = list(object({
    port     = number
    protocol = optional(string, "tcp")
  }))
  description = "The catalog's service ports, each served by an NLB TCP listener and target group. protocol is the catalog port's protocol (http, http2, grpc or tcp), recorded on the target group; the NLB forwards TCP for all of them."

  validation {
    condition     = length(var.listener_ports) > 0 && length(var.listener_ports) == length(distinct([for p in var.listener_ports : p.port]))
    error_message = "Give at least one listener port, each port once."
  }

  validation {
    condition     = alltrue([for p in var.listener_ports : p.port >= 1 && p.port <= 65535 && floor(p.port) == p.port])
    error_message = "Each listener port must be a whole number between 1 and 65535."
  }

  validation {
    condition     = alltrue([for p in var.listener_ports : contains(["http", "http2", "grpc", "tcp"], p.protocol)])
    error_message = "Each listener protocol must be http, http2, grpc or tcp, as in the catalog."
  }

  validation {
    condition     = length(setintersection([for p in var.listener_ports : p.port], [7946, 9100, 9102, 9180, 15000, 15090, 18000])) == 0
    error_message = "Listener ports must not use the appliance's own ports: 7946 (gossip), 9100 (node exporter), 9102 (metrics), 9180 (admin), 15000 (Envoy admin), 15090 (Envoy stats), 18000 (xDS)."
  }
}

variable "reverse_port" {
  type        = number
  default     = null
  description = "The reverse direction's inbound mTLS port (fwdproxy's reverse.port, 15443 by default there), served by one more NLB listener and target group, for mesh workloads calling VM services through the fleet; null: none."

  validation {
    condition     = var.reverse_port == null ? true : (var.reverse_port >= 1 && var.reverse_port <= 65535 && floor(var.reverse_port) == var.reverse_port && !contains([7946, 9100, 9102, 9180, 15000, 15090, 18000], var.reverse_port))
    error_message = "reverse_port must be a whole number between 1 and 65535 and not one of the appliance's own ports (7946, 9100, 9102, 9180, 15000, 15090, 18000)."
  }
}

variable "mesh_cidrs" {
  type        = list(string)
  default     = []
  description = "CIDRs of the mesh workloads (pods or nodes) allowed to reach reverse_port; required with it. They authenticate with mesh mTLS as well."

  validation {
    condition     = alltrue([for c in var.mesh_cidrs : can(cidrhost(c, 0))])
    error_message = "Each mesh CIDR must be a CIDR block such as 10.100.0.0/16."
  }
}

variable "client_cidrs" {
  type        = list(string)
  description = "CIDRs of the legacy VMs allowed to reach the service ports (the NLB preserves client addresses, so the instances' security group admits these; the catalog's allowedClients narrows further per service)."

  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "Give at least one client CIDR, e.g. 10.0.0.0/8."
  }
}

variable "monitoring_cidrs" {
  type        = list(string)
  default     = []
  description = "CIDRs of the Prometheus servers that scrape the instances: fwdproxy metrics (metrics_port), Envoy stats (15090) and the node exporter (9100)."

  validation {
    condition     = alltrue([for c in var.monitoring_cidrs : can(cidrhost(c, 0))])
    error_message = "Each monitoring CIDR must be a CIDR block such as 10.50.0.0/24."
  }
}

variable "egress_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Where the instances may connect: the mesh's east-west gateways (15443), the AWS APIs (Auto Scaling, EC2, ACM PCA; or their VPC endpoints) and the package mirrors."
}

variable "metrics_port" {
  type        = number
  default     = 9102
  description = "The daemon's metrics port (metrics.address): /metrics for Prometheus, /ready for the NLB health check."
}

variable "gossip_port" {
  type        = number
  default     = 7946
  description = "Gossip port between the instances (peers.bind), TCP and UDP."
}

variable "dataplane" {
  type        = string
  default     = "envoy"
  description = "What moves the bytes: envoy (Envoy from the image, run by fwdproxy-envoy.service, configured by the daemon over ADS/SDS) or builtin (the daemon's own data plane)."

  validation {
    condition     = contains(["envoy", "builtin"], var.dataplane)
    error_message = "The dataplane must be envoy or builtin."
  }
}

variable "fwdproxy_config" {
  type        = any
  description = "The daemon's configuration (the structure of examples/config.yaml) as an object; at least gateways and identity. The module sets metrics.address, peers.bind, dataplane, envoy.adminAddress and xds.group (envoy), defaults admin.group to fwdproxy-admin, and adds catalog.yaml to discovery.files when catalog_yaml is set. Rendered to /etc/fwdproxy/config.yaml at boot; never put private keys here (user data is readable through the EC2 API)."

  validation {
    condition     = can(var.fwdproxy_config.gateways) && can(var.fwdproxy_config.identity.spiffeID)
    error_message = "The fwdproxy_config must set gateways and identity.spiffeID (see examples/config.yaml)."
  }
}

variable "catalog_yaml" {
  type        = string
  default     = null
  description = "A static catalog (examples/catalog.yaml format) written to /etc/fwdproxy/catalog.yaml; null when the catalog comes from Kubernetes discovery or the fleet admin API. User data is limited to 16 KiB after compression."
}

variable "gossip_keyring_secret_arn" {
  type        = string
  description = "ARN of the Secrets Manager secret holding the fleet's gossip keyring: the output of `fwdproxy keygen`, one base64 key per line, the first one encrypting. Instances fetch it at boot into /etc/fwdproxy/gossip.keys (0600); a peer without it cannot join."

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.gossip_keyring_secret_arn))
    error_message = "gossip_keyring_secret_arn must be a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME)."
  }
}

variable "acm_pca_arn" {
  type        = string
  default     = null
  description = "ARN of the AWS Private CA that issues the fleet identity (identity.acmpca in fwdproxy_config); grants the instances acm-pca:IssueCertificate on it with the API-passthrough template only. null grants no ACM PCA access."

  validation {
    condition     = var.acm_pca_arn == null ? true : can(regex("^arn:aws[a-z-]*:acm-pca:[a-z0-9-]+:[0-9]{12}:certificate-authority/[0-9a-f-]+$", var.acm_pca_arn))
    error_message = "The acm_pca_arn must be a private CA ARN: arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID."
  }
}

variable "acm_pca_template_arn" {
  type        = string
  default     = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
  description = "The only certificate template the instances may issue with (identity.acmpca.templateArn): the end-entity API-passthrough template carries the SPIFFE URI SAN from the request."
}

variable "dns_zones" {
  type = map(object({
    names = optional(list(string), [])
  }))
  default     = {}
  description = "The DNS rewrite: Route 53 private hosted zones, by zone name (e.g. svc.cluster.local, or one per namespace such as bookinfo.svc.cluster.local, or a legacy alias domain), answering with the NLB. names lists the records to create, relative to the zone (e.g. reviews.bookinfo); empty creates a wildcard record (*.ZONE)."

  validation {
    condition     = alltrue([for z in keys(var.dns_zones) : can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?$", z))])
    error_message = "Each dns_zones key must be a lower-case DNS name without a trailing dot, e.g. svc.cluster.local."
  }
}

variable "dns_vpc_ids" {
  type        = list(string)
  default     = []
  description = "The legacy VMs' VPCs (in this account and region) associated with the private hosted zones, so their resolvers answer the mesh names with the NLB. Associate VPCs of other accounts with aws_route53_vpc_association_authorization."
}

variable "health_check" {
  type = object({
    interval_seconds    = optional(number, 10)
    timeout_seconds     = optional(number, 5)
    healthy_threshold   = optional(number, 3)
    unhealthy_threshold = optional(number, 2)
  })
  default     = {}
  description = "NLB health check of the daemon's /ready endpoint on metrics_port: ready only with an identity, a catalog and a snapshot the data plane acknowledged."

  validation {
    condition = (
      var.health_check.interval_seconds >= 5 && var.health_check.interval_seconds <= 300 &&
      var.health_check.timeout_seconds >= 2 && var.health_check.timeout_seconds <= 120 &&
      var.health_check.timeout_seconds < var.health_check.interval_seconds &&
      var.health_check.healthy_threshold >= 2 && var.health_check.healthy_threshold <= 10 &&
      var.health_check.unhealthy_threshold >= 2 && var.health_check.unhealthy_threshold <= 10
    )
    error_message = "NLB health checks take an interval of 5-300s, a timeout of 2-120s shorter than the interval, and thresholds of 2-10."
  }
}

variable "health_check_grace_period" {
  type        = number
  default     = 180
  description = "Seconds after launch before Auto Scaling acts on the NLB health check (boot, identity issuance, first catalog)."
}

variable "deregistration_delay" {
  type        = number
  default     = 60
  description = "Seconds the NLB keeps draining an instance's connections after deregistering it, before termination proceeds."

  validation {
    condition     = var.deregistration_delay >= 0 && var.deregistration_delay <= 3600
    error_message = "The deregistration_delay must be between 0 and 3600 seconds."
  }
}

variable "termination_timeout" {
  type        = number
  default     = 300
  description = "Heartbeat timeout of the termination lifecycle hook: how long an instance may take to stop Envoy and leave gossip before Auto Scaling terminates it anyway."

  validation {
    condition     = var.termination_timeout >= 30 && var.termination_timeout <= 7200
    error_message = "The termination_timeout must be between 30 and 7200 seconds."
  }
}

variable "cross_zone_load_balancing" {
  type        = bool
  default     = true
  description = "Spread each zone's NLB traffic over the instances of every zone (keeps load even when zones have unequal instance counts)."
}

variable "instance_refresh_min_healthy_percentage" {
  type        = number
  default     = 90
  description = "During an instance refresh (e.g. a new AMI), the share of capacity kept in service."
}

variable "enable_deletion_protection" {
  type        = bool
  default     = true
  description = "Protect the NLB from deletion (a new NLB gets a new DNS name; the private zones follow it, but clients with cached answers do not at once)."
}

variable "enable_ssm" {
  type        = bool
  default     = true
  description = "Attach AmazonSSMManagedInstanceCore so operators reach instances with Session Manager instead of SSH."
}

variable "root_volume_size" {
  type        = number
  default     = 16
  description = "Root volume size in GiB (gp3, encrypted)."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Tags on every resource, propagated to the instances."
}
